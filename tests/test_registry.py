"""Backend selection: explicit request > KBIT_BACKEND > priority, fallback, explanations."""

import os
import warnings

import pytest
import torch
from pydantic import ValidationError

import kbit
import kbit.functional as F
from kbit.backend import API_VERSION, Backend, BackendManifest, OpSupport
from kbit_reference.backend import ReferenceBackend

CALLS: list[str] = []


class Recording(ReferenceBackend):
    """The reference ops, recording which registered backend ran them."""

    def quantize_blockwise(self, A, *, code, blocksize, **rand):
        CALLS.append(self.name)
        return super().quantize_blockwise(A, code=code, blocksize=blocksize, **rand)


class Offline(Backend):
    def is_available(self):
        return "device is switched off"


def _manifest(name, priority=10, device_types=("cpu",), factory="tests.test_registry:Recording", **ops):
    ops = ops or {"quantize_blockwise": OpSupport(dtypes=("float32",))}
    return BackendManifest(
        name=name, api_version=API_VERSION, priority=priority, device_types=device_types, factory=factory, ops=ops
    )


@pytest.fixture(autouse=True)
def _clear_calls():
    CALLS.clear()


def _quantize(dtype=torch.float32):
    return F.quantize_blockwise(torch.randn(300, dtype=dtype), blocksize=64)


def test_only_reference_on_cpu():
    choice = kbit.backends.resolve("quantize_blockwise", "cpu", torch.float32, blocksize=64)
    assert choice.name == "reference" and not choice.fallback
    assert isinstance(choice.backend, ReferenceBackend)


def test_priority_order():
    kbit.backends.register(_manifest("low", priority=5))
    kbit.backends.register(_manifest("high", priority=20))
    assert kbit.backends.resolve("quantize_blockwise", "cpu", "float32").name == "high"
    _quantize()
    assert CALLS == ["high"]


def test_environment_preference_beats_priority(monkeypatch):
    kbit.backends.register(_manifest("low", priority=5))
    kbit.backends.register(_manifest("high", priority=20))
    monkeypatch.setenv("KBIT_BACKEND", "low")
    assert kbit.backends.resolve("quantize_blockwise", "cpu", "float32").name == "low"
    monkeypatch.setenv("KBIT_BACKEND", "reference,low")
    assert kbit.backends.resolve("quantize_blockwise", "cpu", "float32").name == "reference"


def test_use_backend_beats_environment_and_nests(monkeypatch):
    kbit.backends.register(_manifest("low", priority=5))
    kbit.backends.register(_manifest("high", priority=20))
    monkeypatch.setenv("KBIT_BACKEND", "high")
    with kbit.backends.use_backend("low"):
        _quantize()
        with kbit.backends.use_backend(["high", "low"]):
            _quantize()
        _quantize()
    _quantize()
    assert CALLS == ["low", "high", "low", "high"]


def test_per_call_backend_argument():
    kbit.backends.register(_manifest("low", priority=-5))  # below the reference
    F.quantize_blockwise(torch.randn(10), blocksize=64, backend="low")
    F.quantize_blockwise(torch.randn(10), blocksize=64)
    assert CALLS == ["low"]


def test_preferred_backend_without_the_op_falls_back_with_one_warning():
    kbit.backends.register(_manifest("partial"))
    with kbit.backends.use_backend("partial"):
        with pytest.warns(kbit.KbitFallbackWarning, match="partial: dtype float16"):
            _quantize(torch.float16)
        with warnings.catch_warnings():
            warnings.simplefilter("error", kbit.KbitFallbackWarning)
            _quantize(torch.float16)  # once per op
        choice = kbit.backends.resolve("quantize_blockwise", "cpu", torch.float16)
    assert choice.name == "reference" and choice.fallback
    assert choice.rejected == (("partial", "dtype float16 not in declared ['float32']"),)


def test_fallback_error_policy(monkeypatch):
    kbit.backends.register(_manifest("partial"))
    monkeypatch.setenv("KBIT_FALLBACK", "error")
    with kbit.backends.use_backend("partial"):
        with pytest.raises(kbit.NoBackendError, match="partial: dtype float16") as info:
            _quantize(torch.float16)
        assert isinstance(info.value, kbit.UnsupportedOpError)
        _quantize(torch.float32)  # what it declares still works
    assert CALLS == ["partial"]


def test_use_backend_fallback_overrides_the_environment_for_the_block_only(monkeypatch):
    kbit.backends.register(_manifest("partial"))
    monkeypatch.setenv("KBIT_FALLBACK", "reference")
    with kbit.backends.use_backend("partial", fallback="error"):
        with pytest.raises(kbit.NoBackendError, match="partial: dtype float16"):
            _quantize(torch.float16)
        with kbit.backends.use_backend("partial"):  # an inner block without fallback= keeps it
            with pytest.raises(kbit.NoBackendError):
                _quantize(torch.float16)
    assert os.environ["KBIT_FALLBACK"] == "reference"
    with kbit.backends.use_backend("partial"), pytest.warns(kbit.KbitFallbackWarning):
        _quantize(torch.float16)  # outside the block the environment's policy applies again
    with pytest.raises(kbit.KbitValueError, match="fallback='never'"):
        kbit.backends.use_backend("partial", fallback="never")


def test_bad_fallback_policy_is_reported(monkeypatch):
    monkeypatch.setenv("KBIT_FALLBACK", "maybe")
    with pytest.raises(kbit.KbitValueError, match="KBIT_FALLBACK='maybe'"):
        _quantize()


def test_device_without_native_backend_falls_back(monkeypatch):
    choice = kbit.backends.resolve("quantize_blockwise", "cuda", torch.float32, blocksize=64)
    assert choice.name == "reference" and choice.fallback
    assert choice.rejected[0][0] == "cuda" and "unavailable" in choice.rejected[0][1]
    monkeypatch.setenv("KBIT_FALLBACK", "error")
    with pytest.raises(kbit.NoBackendError, match="cuda: unavailable"):
        kbit.backends.resolve("quantize_blockwise", "cuda", torch.float32, blocksize=64)
    with pytest.raises(kbit.NoBackendError, match="no installed backend declares device type 'xpu'") as info:
        kbit.backends.resolve("quantize_blockwise", "xpu", torch.float32)
    assert str(info.value).startswith("quantize_blockwise: no backend supports this call: ")


def test_named_unavailable_backend_is_an_error():
    kbit.backends.register(_manifest("offline", factory="tests.test_registry:Offline"))
    records = {r.name: r for r in kbit.backends.list()}
    assert records["offline"].state == "unavailable" and records["offline"].reason == "device is switched off"
    assert kbit.backends.resolve("quantize_blockwise", "cpu", "float32").name == "reference"
    with kbit.backends.use_backend("offline"):
        with pytest.raises(kbit.BackendUnavailableError, match="switched off"):
            _quantize()


def test_unknown_backend_name():
    with kbit.backends.use_backend("nosuch"):
        with pytest.raises(kbit.BackendNotFoundError, match="nosuch.*known: .*reference"):
            _quantize()
    with pytest.raises(kbit.BackendNotFoundError):
        kbit.backends.get("nosuch")


def test_resolve_explains_every_rejection():
    kbit.backends.register(_manifest("offline", priority=50, factory="tests.test_registry:Offline"))
    kbit.backends.register(_manifest("narrow", priority=40, quantize_blockwise=OpSupport(blocksizes=(64,))))
    kbit.backends.register(_manifest("other_op", priority=30, dequantize_blockwise=OpSupport()))
    choice = kbit.backends.resolve("quantize_blockwise", "cpu", "float32", blocksize=4096)
    assert choice.name == "reference"
    assert dict(choice.rejected) == {
        "offline": "unavailable: device is switched off",
        "narrow": "blocksize=4096 not in declared [64]",
        "other_op": "does not declare quantize_blockwise",
    }
    assert "not narrow: blocksize=4096" in choice.explain()


def test_resolve_rejects_unknown_ops_and_params():
    with pytest.raises(kbit.KbitValueError, match="op='quantise'"):
        kbit.backends.resolve("quantise", "cpu")
    with pytest.raises(kbit.KbitValueError, match="colour"):
        kbit.backends.resolve("quantize_blockwise", "cpu", colour="red")


def test_decisions_are_cached_until_reset():
    kbit.backends.register(_manifest("cached"))
    first = kbit.backends.resolve("quantize_blockwise", "cpu", "float32")
    assert kbit.backends.resolve("quantize_blockwise", "cpu", "float32") is first
    kbit.backends.reset()
    assert "cached" not in kbit.backends.available()


def test_availability_is_probed_once():
    probes = []

    class Counting(ReferenceBackend):
        def is_available(self):
            probes.append(1)
            return True

    import tests.test_registry as module

    module.Counting = Counting
    kbit.backends.register(_manifest("counting", factory="tests.test_registry:Counting"))
    for _ in range(3):
        kbit.backends.list()
        _quantize()
    assert probes == [1]


def test_register_refuses_duplicates_and_bad_manifests():
    with pytest.raises(kbit.KbitValueError, match="reference"):
        kbit.backends.register(_manifest("reference"))
    with pytest.raises(ValidationError, match="unknown op"):
        _manifest("typo", quantize_blockwize=OpSupport())
    with pytest.raises(ValidationError, match="name"):
        _manifest("Bad Name")
    with pytest.raises(ValidationError, match="factory"):
        _manifest("nofactory", factory="not a path")
    with pytest.raises(ValidationError, match="frozen"):
        manifest = _manifest("frozen")
        manifest.priority = 3


def test_use_backend_validates_names():
    with pytest.raises(kbit.KbitValueError):
        kbit.backends.use_backend([])


def test_record_calls_counts_served_ops():
    kbit.backends.register(_manifest("partial"))
    with kbit.backends.record_calls() as log:
        _quantize(torch.float32)
        _quantize(torch.float16)
        with kbit.backends.record_calls() as inner:
            _quantize(torch.float32)
    _quantize(torch.float32)  # outside: not counted
    assert log.by_op() == {"quantize_blockwise": {"partial": 2, "reference": 1}}
    assert inner.counts == {("quantize_blockwise", "cpu", "partial"): 1}
