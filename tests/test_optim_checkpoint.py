"""Optimizer checkpoints: nested layout, flat layout, no casting, validation, exact resume."""

import copy
import io

import pytest
import torch

import kbit
import kbit.optim as O
from kbit import KbitValueError, QuantStateError

NESTED = "__bnb_optimizer_quant_state__"


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)).to(dtype)


def _grads(model, step, dtype):
    gen = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        if step == 2:
            p.grad[:1] *= 50  # a spike, so that percentile clipping acts


def _steps(model, optimizer, start, stop, dtype=torch.float32):
    for step in range(start, stop):
        _grads(model, step, dtype)
        optimizer.step()


def _saved(optimizer) -> dict:
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


RESUME_CASES = {
    "Adam8bit-clipping": lambda ps: O.Adam8bit(ps, lr=1e-2, min_8bit_size=1024, percentile_clipping=5),
    "LAMB8bit-whole-tensor": lambda ps: O.LAMB8bit(ps, lr=1e-2, min_8bit_size=1024, weight_decay=0.01),
    "AdEMAMix8bit-schedules": lambda ps: O.AdEMAMix8bit(ps, lr=1e-2, min_8bit_size=1024, t_alpha=5, t_beta3=5),
    "Lion32bit": lambda ps: O.Lion32bit(ps, lr=1e-3),
    "SGD8bit": lambda ps: O.SGD8bit(ps, lr=1e-2, momentum=0.9, min_8bit_size=1024),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(RESUME_CASES))
def test_resumed_run_is_bit_identical(name, dtype):
    make = RESUME_CASES[name]
    straight = _model(dtype)
    straight_opt = make(straight.parameters())
    _steps(straight, straight_opt, 0, 6, dtype)

    first = _model(dtype)
    first_opt = make(first.parameters())
    _steps(first, first_opt, 0, 3, dtype)
    checkpoint = {"model": copy.deepcopy(first.state_dict()), "optimizer": _saved(first_opt)}

    resumed = _model(dtype, seed=123)  # different initial weights: everything comes from the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = make(resumed.parameters())
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    _steps(resumed, resumed_opt, 3, 6, dtype)

    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        sa, sb = straight_opt.state[a], resumed_opt.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert torch.equal(sa[key], sb[key]) and sa[key].dtype == sb[key].dtype, key
            else:
                assert sa[key] == sb[key], key


def _trained(make=lambda ps: O.Adam8bit(ps, lr=1e-2, min_8bit_size=1024, percentile_clipping=5), dtype=torch.float32):
    model = _model(dtype)
    optimizer = make(model.parameters())
    _steps(model, optimizer, 0, 2, dtype)
    return model, optimizer


def test_state_dict_nests_quantization_tensors():
    model, optimizer = _trained()
    state = optimizer.state_dict()["state"]
    big = state[0]  # the 96x64 weight: 8-bit state
    assert set(big) == {"step", NESTED}
    assert set(big[NESTED]) == {"state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2", "gnorm_vec"}
    assert big[NESTED]["state1"].dtype == torch.uint8
    small = state[1]  # the bias: 32-bit state, still nested
    assert set(small[NESTED]) == {"state1", "state2", "gnorm_vec"}
    live = optimizer.state[next(model.parameters())]
    assert "state1" in live and NESTED not in live, "state_dict() must not rearrange the live state"


def test_state_dict_survives_a_tool_that_casts_floating_point_state():
    """Sharded-checkpoint tools cast top-level float tensors to the model dtype; nested ones are left alone."""
    model, optimizer = _trained()
    saved = _saved(optimizer)
    for param_state in saved["state"].values():
        for key, value in list(param_state.items()):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                param_state[key] = value.half()
    fresh = O.Adam8bit(_model().parameters(), lr=1e-2, min_8bit_size=1024, percentile_clipping=5)
    fresh.load_state_dict(saved)
    for a, b in zip(optimizer.state.values(), fresh.state.values(), strict=True):
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[key]) and value.dtype == b[key].dtype, key


def test_flat_and_nested_forms_load_the_same_state():
    model, optimizer = _trained()
    nested = _saved(optimizer)
    flat = copy.deepcopy(nested)
    flat["state"] = {k: {**{x: y for x, y in v.items() if x != NESTED}, **v[NESTED]} for k, v in flat["state"].items()}
    loaded = []
    for form in (nested, flat):
        fresh_model = _model()
        fresh = O.Adam8bit(fresh_model.parameters(), lr=1e-2, min_8bit_size=1024, percentile_clipping=5)
        fresh.load_state_dict(form)
        loaded.append(fresh)
    for pa, pb, po in zip(loaded[0].state.values(), loaded[1].state.values(), optimizer.state.values(), strict=True):
        for key in po:
            if isinstance(po[key], torch.Tensor):
                assert torch.equal(pa[key], po[key]) and torch.equal(pb[key], po[key]), key


def test_loading_never_casts_and_never_shares_storage():
    model, optimizer = _trained(dtype=torch.float16)
    saved = optimizer.state_dict()  # not serialised: the very tensors of the live state
    fresh = O.Adam8bit(_model(torch.float16).parameters(), lr=1e-2, min_8bit_size=1024, percentile_clipping=5)
    fresh.load_state_dict(saved)
    weight_state = fresh.state[next(fresh.param_groups[0]["params"].__iter__())]
    assert weight_state["state1"].dtype == torch.uint8
    assert weight_state["absmax1"].dtype == torch.float32 and weight_state["qmap1"].dtype == torch.float32
    bias_state = fresh.state[fresh.param_groups[0]["params"][1]]
    assert bias_state["state1"].dtype == torch.float32, "32-bit state of a float16 parameter stays float32"
    original = optimizer.state[optimizer.param_groups[0]["params"][0]]["state1"]
    assert weight_state["state1"].data_ptr() != original.data_ptr()


def _snapshot(optimizer):
    return {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for p, s in optimizer.state.items()}


def _corrupt(saved, index, key, value):
    saved = copy.deepcopy(saved)
    container = saved["state"][index][NESTED] if key != "step" else saved["state"][index]
    if value is None:
        del container[key]
    else:
        container[key] = value
    return saved


@pytest.mark.parametrize(
    "index, key, value, fragment",
    [
        (0, "state1", torch.zeros(10, dtype=torch.uint8), "does not fit"),
        (0, "state1", torch.zeros(64, 96, dtype=torch.float16), "float32 or uint8"),
        (0, "state2", torch.zeros(64, 96), "dtype"),
        (0, "absmax1", None, "absmax1"),
        (0, "absmax1", torch.zeros(3), "absmax1"),
        (0, "qmap2", torch.zeros(16), "qmap2"),
        (0, "gnorm_vec", torch.zeros(7), "gnorm_vec"),
        (1, "state2", None, "state2"),
        (1, "exp_avg", torch.zeros(64), "exp_avg"),
        (0, "step", -1, "step"),
    ],
)
def test_mismatched_state_is_rejected_and_nothing_changes(index, key, value, fragment):
    model, optimizer = _trained()
    saved = _corrupt(_saved(optimizer), index, key, value)
    target_model, target = _trained()
    before = _snapshot(target)
    with pytest.raises(QuantStateError, match=fragment):
        target.load_state_dict(saved)
    after = _snapshot(target)
    for pid, state in before.items():
        for k, v in state.items():
            assert (torch.equal(v, after[pid][k]) if isinstance(v, torch.Tensor) else v == after[pid][k]), k


def test_checkpoints_of_other_optimizers_and_shapes_are_rejected():
    model, optimizer = _trained()
    torch_model = _model()
    torch_opt = torch.optim.Adam(torch_model.parameters())
    _steps(torch_model, torch_opt, 0, 1)
    with pytest.raises(QuantStateError, match="state1"):
        optimizer.load_state_dict(torch_opt.state_dict())
    one_group = O.Adam8bit([{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}])
    with pytest.raises(KbitValueError, match="groups"):
        one_group.load_state_dict(optimizer.state_dict())
    lion = O.Lion8bit(model.parameters(), min_8bit_size=1024)
    with pytest.raises(QuantStateError, match="state2"):
        lion.load_state_dict(optimizer.state_dict())


def test_bitsandbytes_style_flat_checkpoint_with_whole_tensor_scales_loads():
    model, optimizer = _trained(lambda ps: O.LAMB8bit(ps, min_8bit_size=1024))
    weight_state = optimizer.state[next(model.parameters())]
    assert {"max1", "new_max1", "max2", "new_max2", "unorm_vec"} <= set(weight_state)
    saved = _saved(optimizer)
    fresh = O.LAMB8bit(_model().parameters(), min_8bit_size=1024)
    fresh.load_state_dict(saved)
    assert kbit.optim.LAMB8bit is O.LAMB8bit
    assert torch.equal(fresh.state[fresh.param_groups[0]["params"][0]]["max1"], weight_state["max1"])


@pytest.mark.parametrize(
    "make_source, make_target, key, fragment",
    [
        (lambda ps: O.Adam8bit(ps, min_8bit_size=1024), lambda ps: O.Adam32bit(ps), "state1", "holds blockwise 8-bit.*keeps 32-bit"),
        (lambda ps: O.Adam32bit(ps), lambda ps: O.Adam8bit(ps, min_8bit_size=1024), "state1", "holds 32-bit.*keeps blockwise"),
        (lambda ps: O.Adam8bit(ps, min_8bit_size=1024), lambda ps: O.Adam8bit(ps, min_8bit_size=8192),
         "state1", "keeps 32-bit.*min_8bit_size=8192"),  # fmt: skip
        (lambda ps: O.Adam8bit(ps, min_8bit_size=1024),
         lambda ps: O.Adam8bit(ps, min_8bit_size=1024, block_wise=False), "absmax1", "holds blockwise.*keeps whole-tensor"),  # fmt: skip
        (lambda ps: O.Adam8bit(ps, min_8bit_size=1024, block_wise=False),
         lambda ps: O.Adam8bit(ps, min_8bit_size=1024), "max1", "holds whole-tensor.*keeps blockwise"),  # fmt: skip
    ],
    ids=["8bit-into-32bit", "32bit-into-8bit", "below-min_8bit_size", "blockwise-into-whole", "whole-into-blockwise"],
)
def test_a_checkpoint_of_another_state_layout_is_rejected(make_source, make_target, key, fragment):
    _, source = _trained(make_source)
    target = make_target(_model().parameters())
    with pytest.raises(QuantStateError, match=rf"parameter 0 of group 0\.{key}.*{fragment}"):
        target.load_state_dict(_saved(source))
    assert not target.state, "a rejected checkpoint leaves the optimizer unchanged"


def test_a_per_parameter_override_decides_the_expected_layout():
    _, source = _trained(lambda ps: O.Adam8bit(ps, min_8bit_size=1024))
    model = _model()
    first = next(model.parameters())
    manager = O.GlobalOptimManager.get_instance()
    try:
        manager.override_config(first, "optim_bits", 32)
        with pytest.raises(QuantStateError, match=r"parameter 0 of group 0\.state1"):
            O.Adam8bit(model.parameters(), min_8bit_size=1024).load_state_dict(_saved(source))
    finally:
        manager.initialize()


def test_state_dict_code_tables_are_copies_of_the_shared_ones():
    # torch.distributed.checkpoint.load writes a checkpoint into the state dict's tensors in
    # place: the tables every optimizer shares must not be among them.
    p = torch.nn.Parameter(torch.randn(4096))
    optimizer = kbit.optim.Adam8bit([p])
    p.grad = torch.randn(4096)
    optimizer.step()
    saved = optimizer.state_dict()["state"][0]["__bnb_optimizer_quant_state__"]
    saved["qmap1"].fill_(0.0)
    assert optimizer.state[p]["qmap1"].abs().max() == 1.0
    assert optimizer.state[p]["state1"].data_ptr() == saved["state1"].data_ptr()  # states are not copied


def test_parameter_names_in_place_of_indices_load_by_position():
    # torch.distributed.checkpoint.state_dict hands load_state_dict states keyed by parameter
    # name (FQN), relying on loading by position as torch.optim does.
    model = torch.nn.Linear(64, 64)
    optimizer = kbit.optim.Adam8bit(model.parameters(), min_8bit_size=0)
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    names = {0: "weight", 1: "bias"}
    by_name = {
        "state": {names[index]: state for index, state in saved["state"].items()},
        "param_groups": [dict(group, params=[names[i] for i in group["params"]]) for group in saved["param_groups"]],
    }
    fresh = kbit.optim.Adam8bit(model.parameters(), min_8bit_size=0)
    fresh.load_state_dict(by_name)
    assert torch.equal(fresh.state[model.weight]["state1"], optimizer.state[model.weight]["state1"])
    by_name["param_groups"][0]["params"] = [1.5, 2.5]
    with pytest.raises(KbitValueError, match="parameter indices or names"):
        fresh.load_state_dict(by_name)
