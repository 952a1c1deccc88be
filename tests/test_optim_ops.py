"""The optimizer ops: custom-op schemas, the public functional API, argument checks, clipping."""

import re

import pytest
import torch
from torch.library import opcheck

import kbit
import kbit.functional as F
from kbit import KbitTypeError, KbitValueError, UnsupportedOpError
from kbit.backend import OPTIMIZER_KINDS, OptimizerStep

Q1 = F.create_dynamic_map()
Q2 = F.create_dynamic_map(signed=False)
N = 1000  # four blocks of 256, the last one partial
NB = 4


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _adam_8bit_args(dtype=torch.float32):
    gen = _gen()
    p = torch.randn(N, generator=gen).to(dtype)
    g = torch.randn(N, generator=gen).to(dtype)
    s1 = torch.randint(0, 256, (N,), dtype=torch.uint8, generator=gen)
    s2 = torch.randint(0, 256, (N,), dtype=torch.uint8, generator=gen)
    return g, p, s1, s2


def _op_samples():
    g, p, s1, s2 = _adam_8bit_args()
    f1, f2 = torch.rand(N), torch.rand(N)
    a1, a2 = torch.rand(NB), torch.rand(NB)
    half_g, half_p, _, _ = _adam_8bit_args(torch.bfloat16)
    stacked = torch.randint(0, 256, (2, N), dtype=torch.uint8, generator=_gen(3))
    def flat(kind, step, skip_zeros=False, **hyper):
        return OptimizerStep(OPTIMIZER_KINDS[kind], step, skip_zeros=skip_zeros, **hyper).to_op_args()

    return {
        "optimizer_update_32bit": [
            (g, p, f1, f2, None, *flat("adam", 3, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)),
            (half_g, half_p, f1, None, torch.zeros(1),
             *flat("lars", 2, True, lr=1e-2, beta1=0.9, gnorm_scale=0.5, max_unorm=0.02)),
        ],
        "optimizer_update_8bit": [
            (g, p, s1, s2, Q1, Q2, torch.ones(1), torch.ones(1) * 2, torch.zeros(1), torch.zeros(1), None,
             *flat("adam", 2, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)),
            (g, p, s1, None, Q1, None, torch.ones(1), None, torch.zeros(1), None, torch.zeros(1),
             *flat("momentum", 2, lr=1e-3, beta1=0.9, max_unorm=0.1)),
        ],
        "optimizer_update_8bit_blockwise": [
            (g, p, s1, s2, Q1, Q2, a1, a2, *flat("adam", 2, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)),
            (half_g, half_p, stacked, s2, Q1, Q2, torch.rand(2, NB), a2,
             *flat("ademamix", 4, True, lr=1e-3, beta1=0.9, beta2=0.999, beta3=0.999, alpha=5.0, eps=1e-8,
                   weight_decay=0.01)),
        ],
        "percentile_clipping": [(g, torch.rand(100), 7, 5), (half_g, torch.rand(100), 1, 50)],
    }  # fmt: skip


@pytest.mark.parametrize("op_name", sorted(_op_samples()))
def test_opcheck(op_name):
    op = getattr(torch.ops.kbit, op_name).default
    for args in _op_samples()[op_name]:
        opcheck(op, args)


def test_update_ops_declare_what_they_mutate():
    schema = str(torch.ops.kbit.optimizer_update_8bit_blockwise.default._schema)
    for name in ("p", "state1", "state2", "absmax1", "absmax2"):
        assert re.search(rf"Tensor\(a\d+!\)\?? {name}\b", schema), (name, schema)
    assert re.search(r"Tensor g\b", schema)  # the gradient is read only
    assert re.search(r"Tensor qmap1\b", schema)


# ------------------------------------------------------------------- functional API
def _golden_free_adam_32bit_reference(p, g, m, v, step, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=0.0):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    c1, c2 = 1 - b1**step, (1 - b2**step) ** 0.5
    p = p * (1 - lr * wd) - lr * (c2 / c1) * m / (v.sqrt() + eps * c2)
    return p, m, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_32bit_adam_follows_the_format_rule(dtype):
    gen = _gen(1)
    p = torch.randn(300, generator=gen).to(dtype)
    ref_p, m, v = p.float().clone(), torch.zeros(300), torch.zeros(300)
    s1, s2 = torch.zeros(300), torch.zeros(300)
    for step in range(1, 4):
        g = torch.randn(300, generator=gen).to(dtype)
        F.optimizer_update_32bit("adam", g, p, s1, 0.9, 1e-8, step, 1e-2, s2, 0.999, weight_decay=0.1)
        ref_p, m, v = _golden_free_adam_32bit_reference(ref_p, g.float(), m, v, step, lr=1e-2, wd=0.1)
        ref_p = ref_p.to(dtype).float()  # the parameter is stored in its dtype each step
        torch.testing.assert_close(s1, m, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(s2, v, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(p.float(), ref_p, rtol=1e-5, atol=1e-6 if dtype == torch.float32 else 1e-2)


def test_8bit_blockwise_is_dequantize_update_requantize():
    g, p, s1, s2 = _adam_8bit_args()
    a1, a2 = torch.rand(NB) * 0.1, torch.rand(NB) * 0.01
    m = F.dequantize_blockwise(s1, absmax=a1, code=Q1, blocksize=256)
    v = F.dequantize_blockwise(s2, absmax=a2, code=Q2, blocksize=256)
    ref_p, m, v = _golden_free_adam_32bit_reference(p.clone(), g, m, v, step=3)
    F.optimizer_update_8bit_blockwise("adam", g, p, s1, s2, 0.9, 0.999, 0.0, 0.0, 1e-8, 3, 1e-3, Q1, Q2, a1, a2)
    torch.testing.assert_close(p, ref_p, rtol=1e-5, atol=1e-6)
    codes1, state1 = F.quantize_blockwise(m, code=Q1, blocksize=256)
    codes2, state2 = F.quantize_blockwise(v, code=Q2, blocksize=256)
    torch.testing.assert_close(a1, state1.absmax, rtol=1e-6, atol=0)
    torch.testing.assert_close(a2, state2.absmax, rtol=1e-6, atol=0)
    # The update may round m and v differently by an ulp; codes agree but at ties.
    assert (s1 == codes1).float().mean() > 0.999 and (s2 == codes2).float().mean() > 0.999


def test_8bit_whole_tensor_writes_new_max_and_requantizes_with_it():
    g, p, s1, s2 = _adam_8bit_args()
    max1, max2, new1, new2 = torch.tensor([0.2]), torch.tensor([0.05]), torch.zeros(1), torch.zeros(1)
    m = F.dequantize(s1, absmax=max1, code=Q1)
    v = F.dequantize(s2, absmax=max2, code=Q2)
    _, m, v = _golden_free_adam_32bit_reference(p.clone(), g, m, v, step=2)
    F.optimizer_update_8bit("adam", g, p, s1, s2, 0.9, 0.999, 1e-8, 2, 1e-3, Q1, Q2, max1, max2, new1, new2)
    torch.testing.assert_close(new1, m.abs().max().reshape(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(new2, v.abs().max().reshape(1), rtol=1e-6, atol=0)
    assert torch.equal(max1, torch.tensor([0.2])), "the current scale is read, not written"
    back = F.dequantize(s1, absmax=new1, code=Q1)
    assert (back - m).abs().max() <= 0.0071 * new1  # half the widest gap of the signed map


def test_skip_zeros_leaves_zero_gradient_elements_untouched():
    g, p, s1, s2 = _adam_8bit_args()
    g[::3] = 0
    f1, f2 = torch.rand(N), torch.rand(N)
    before = (p.clone(), f1.clone(), f2.clone())
    F.optimizer_update_32bit("adam", g, p, f1, 0.9, 1e-8, 5, 1e-2, f2, 0.999, skip_zeros=True)
    for now, then in zip((p, f1, f2), before, strict=True):
        assert torch.equal(now[::3], then[::3])
        assert not torch.equal(now[1::3], then[1::3])


def test_lamb_update_norm_is_recorded_and_clipped():
    gen = _gen(4)
    p, g = torch.randn(500, generator=gen), torch.randn(500, generator=gen) * 100
    m, v, unorm = torch.zeros(500), torch.zeros(500), torch.zeros(1)
    p_before = p.clone()
    F.optimizer_update_32bit("lamb", g, p, m, 0.9, 1e-8, 1, 1.0, v, 0.999, unorm_vec=unorm, max_unorm=0.01)
    step_norm = torch.linalg.vector_norm(p - p_before)
    torch.testing.assert_close(step_norm, 0.01 * torch.linalg.vector_norm(p_before), rtol=1e-4, atol=0)
    assert unorm.item() > 0


# ------------------------------------------------------------------------ bad input
def _blockwise_call(**changes):
    g, p, s1, s2 = _adam_8bit_args()
    args = dict(optimizer_name="adam", g=g, p=p, state1=s1, state2=s2, beta1=0.9, beta2=0.999, beta3=0.0,
                alpha=0.0, eps=1e-8, step=1, lr=1e-3, qmap1=Q1, qmap2=Q2, absmax1=torch.zeros(NB),
                absmax2=torch.zeros(NB))  # fmt: skip
    args.update(changes)
    snapshot = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    return args, snapshot


@pytest.mark.parametrize(
    "changes, error, fragment",
    [
        (dict(optimizer_name="adamax"), KbitValueError, "optimizer_name"),
        (dict(lr=-1e-3), KbitValueError, "lr"),
        (dict(eps=-1.0), KbitValueError, "eps"),
        (dict(beta1=1.0), KbitValueError, "beta1"),
        (dict(beta2=-0.1), KbitValueError, "beta2"),
        (dict(lr=float("nan")), KbitValueError, "lr"),
        (dict(beta3=0.5), KbitValueError, "does not use beta3"),
        (dict(alpha=2.0), KbitValueError, "does not use alpha"),
        (dict(step=0), KbitValueError, "step"),
        (dict(state2=None), KbitValueError, "state2"),
        (dict(state1=torch.zeros(N)), KbitTypeError, "state1"),
        (dict(absmax1=torch.zeros(3)), KbitValueError, "absmax1.shape"),
        (dict(qmap1=torch.zeros(16)), KbitValueError, "qmap1.shape"),
        (dict(g=torch.randn(N, dtype=torch.float16)), KbitTypeError, "g"),
        (dict(g=torch.randn(N + 1)), KbitValueError, "g"),
        (dict(p=torch.randn(2 * N)[::2]), KbitValueError, "contiguous"),
    ],
)
def test_bad_arguments_raise_typed_errors_and_change_nothing(changes, error, fragment):
    args, snapshot = _blockwise_call(**changes)
    with pytest.raises(error, match=fragment):
        F.optimizer_update_8bit_blockwise(**args)
    for name, before in snapshot.items():
        assert torch.equal(args[name], before), f"{name} was modified by a rejected call"


def test_unused_hyperparameters_and_states_are_refused_per_kind():
    g, p, _, _ = _adam_8bit_args()
    with pytest.raises(KbitValueError, match="does not use eps"):
        F.optimizer_update_32bit("momentum", g, p, torch.zeros(N), 0.9, 1e-8, 1, 1e-3)
    with pytest.raises(KbitValueError, match="keeps one state"):
        F.optimizer_update_32bit("lion", g, p, torch.zeros(N), 0.9, 0.0, 1, 1e-3, torch.zeros(N), 0.99)
    with pytest.raises(KbitValueError, match="unorm_vec"):
        F.optimizer_update_32bit("lars", g, p, torch.zeros(N), 0.9, 0.0, 1, 1e-3, max_unorm=0.02)
    with pytest.raises(KbitValueError, match="optimizer_name"):  # no beta3/alpha in the seed API
        F.optimizer_update_8bit("ademamix", g, p, torch.zeros(2, N, dtype=torch.uint8), torch.zeros(N, dtype=torch.uint8),
                                0.9, 0.999, 1e-8, 1, 1e-3, Q1, Q2, torch.ones(1), torch.ones(1), torch.zeros(1), torch.zeros(1))  # fmt: skip
    with pytest.raises(KbitTypeError, match="sparse"):
        F.optimizer_update_32bit("momentum", g.to_sparse(), p, torch.zeros(N), 0.9, 0.0, 1, 1e-3)


def test_a_backend_refuses_kinds_its_manifest_does_not_declare(monkeypatch):
    kbit.backends.register(
        {"name": "adamonly", "api_version": kbit.backend.API_VERSION, "priority": 5, "device_types": ["cpu"],
         "factory": "kbit_reference.backend:ReferenceBackend",
         "ops": {"optimizer_update_32bit": {"optimizers": ["adam"]}}}
    )  # fmt: skip
    assert kbit.backends.resolve("optimizer_update_32bit", "cpu", "float32", optimizer="adam").name == "adamonly"
    lion = kbit.backends.resolve("optimizer_update_32bit", "cpu", "float32", optimizer="lion")
    assert lion.name == "reference"
    assert "optimizer='lion' not in declared ['adam']" in lion.explain()
    monkeypatch.setenv("KBIT_FALLBACK", "error")
    g, p, _, _ = _adam_8bit_args()
    with kbit.backends.use_backend("adamonly"), pytest.raises(UnsupportedOpError, match="lion"):
        F.optimizer_update_32bit("lion", g, p, torch.zeros(N), 0.9, 0.0, 1, 1e-3, beta2=0.99)


def test_nan_gradient_poisons_its_8bit_block_visibly_at_the_op_level():
    """The op does not check (the optimizer classes do); a NaN must not hide in a valid code."""
    g, p, s1, s2 = _adam_8bit_args()
    a1, a2 = torch.rand(NB), torch.rand(NB)
    g[300] = float("nan")  # block 1
    F.optimizer_update_8bit_blockwise("adam", g, p, s1, s2, 0.9, 0.999, 0.0, 0.0, 1e-8, 2, 1e-3, Q1, Q2, a1, a2)
    assert a1[1].isnan() and a2[1].isnan(), "the poisoned block's scale must be NaN"
    assert torch.isfinite(a1[[0, 2, 3]]).all() and torch.isfinite(a2[[0, 2, 3]]).all(), "other blocks stay finite"
    assert F.dequantize_blockwise(s1, absmax=a1, code=Q1, blocksize=256)[256:512].isnan().all()


# --------------------------------------------------------------- percentile clipping
def test_percentile_clipping_scales_a_spike_to_the_clip_value():
    gen = _gen(5)
    vec = torch.zeros(100)
    for step in range(1, 21):
        current, clip, scale = F.percentile_clipping(torch.randn(1000, generator=gen), vec, step, percentile=5)
        assert scale == 1.0 or current > clip
    spike = torch.randn(1000, generator=gen) * 50
    current, clip, scale = F.percentile_clipping(spike, vec, 21, percentile=5)
    torch.testing.assert_close(current, torch.linalg.vector_norm(spike))
    assert clip < current / 10
    torch.testing.assert_close(torch.tensor(scale) * current, clip)
    assert vec[21] == pytest.approx(float(torch.linalg.vector_norm(spike)) ** 2, rel=1e-5)


def test_percentile_clipping_step_1_fills_the_history():
    vec = torch.zeros(100)
    g = torch.full((10,), 2.0)
    current, clip, scale = F.percentile_clipping(g, vec, 1, percentile=5)
    assert torch.all(vec == 40.0) and scale == 1.0
    assert float(current) == pytest.approx(40.0**0.5) and float(clip) == pytest.approx(40.0**0.5)


@pytest.mark.parametrize("bad", [dict(percentile=100), dict(percentile=-1), dict(step=0), dict(gnorm_vec=torch.zeros(50))])
def test_percentile_clipping_rejects_bad_arguments(bad):
    args = dict(grad=torch.randn(10), gnorm_vec=torch.zeros(100), step=1, percentile=5)
    args.update(bad)
    with pytest.raises(KbitValueError):
        F.percentile_clipping(**args)


def test_the_reference_manifest_takes_its_optimizer_kinds_from_the_canonical_table(monkeypatch):
    import dataclasses
    import importlib

    import kbit_reference._manifest as manifest

    from kbit import _optim_step

    kinds = _optim_step.OPTIMIZER_KINDS
    declared = {op: set(manifest.MANIFEST.ops[op].optimizers) for op in manifest.MANIFEST.ops if op.startswith("optimizer")}
    assert declared["optimizer_update_32bit"] == declared["optimizer_update_8bit_blockwise"] == set(kinds)
    assert declared["optimizer_update_8bit"] == set(kinds) - {"ademamix"}
    # A kind added to the table is served without a second list to keep in step.
    monkeypatch.setitem(kinds, "newkind", dataclasses.replace(kinds["momentum"], name="newkind"))
    try:
        reloaded = importlib.reload(manifest).MANIFEST
        for op in ("optimizer_update_32bit", "optimizer_update_8bit", "optimizer_update_8bit_blockwise"):
            assert "newkind" in reloaded.ops[op].optimizers, op
    finally:
        monkeypatch.undo()
        importlib.reload(manifest)


@pytest.mark.parametrize("kind_name", ["adam", "momentum"])
def test_the_reference_reads_the_weight_decay_mode_from_the_kind_table(kind_name):
    """Flipping a kind's ``weight_decay`` mode in the table changes what the reference computes:
    decoupled decay scales p, L2 decay adds ``wd * p`` to the gradient."""
    import dataclasses

    from kbit import _optim_step

    kind = _optim_step.OPTIMIZER_KINDS[kind_name]
    flipped = dataclasses.replace(kind, weight_decay="l2" if kind.decoupled_decay else "decoupled")
    gen = _gen(11)
    p0, g, m0 = (torch.randn(300, generator=gen) for _ in range(3))
    hyper = dict(lr=0.1, beta1=0.9, weight_decay=0.5)
    if kind.reads_param("beta2"):
        hyper.update(beta2=0.99, eps=1e-8)
    results = {}
    for label, variant in (("table", kind), ("flipped", flipped)):
        p, s1 = p0.clone(), m0.clone()  # a live momentum: the two modes then differ
        s2 = torch.ones(300) if variant.num_states == 2 else None
        reference = kbit.backends.get("reference")
        for step in (2, 3):  # momentum's two modes agree on one step: L2 decay reaches the buffer
            reference.optimizer_update_32bit(OptimizerStep(variant, step, **hyper), g, p, s1, s2, None)
        results[label] = p
    assert not torch.allclose(results["table"], results["flipped"])
    if kind.decoupled_decay:  # the table's mode: p shrinks by (1 - lr * wd) before the update
        expected, m, v = p0.clone(), m0.clone(), torch.ones(300)
        for step in (2, 3):
            F.optimizer_update_32bit(kind_name, g, expected, m, 0.9, 1e-8, step, 0.1, v, 0.99, weight_decay=0.5)
        torch.testing.assert_close(results["table"], expected, rtol=0, atol=0)


def test_the_kind_table_says_what_each_kind_reads():
    """The table is data a vendor reads: every kind names its states, decay mode, hyperparameters,
    options and the section of docs/formats.md with its rule, and the rule's anchor exists."""
    import pathlib

    from kbit import _optim_step

    formats = (pathlib.Path(__file__).parents[1] / "docs" / "formats.md").read_text()
    for name, kind in _optim_step.OPTIMIZER_KINDS.items():
        assert kind.name == name and kind.num_states in (1, 2) and len(kind.states) == kind.num_states
        assert kind.weight_decay in ("decoupled", "l2")
        assert kind.reads <= set(_optim_step.HYPERPARAMETERS)
        assert kind.rule == f"docs/formats.md#{name}"
        assert f'<a id="{name}"></a>' in formats, f"docs/formats.md has no rule anchor for {name}"
    assert {n for n, k in _optim_step.OPTIMIZER_KINDS.items() if k.decoupled_decay} == {"adam", "lamb", "lion", "ademamix"}


def test_an_optimizer_step_round_trips_through_the_op_boundary():
    from kbit import _optim_step

    for kind in _optim_step.OPTIMIZER_KINDS.values():
        step = OptimizerStep(kind, 7, lr=0.25, beta1=0.5, eps=1e-3, weight_decay=0.125, gnorm_scale=0.75,
                             max_unorm=0.5, skip_zeros=True)  # fmt: skip
        assert OptimizerStep.from_op_args(*step.to_op_args()) == step
