"""The kbit.optim classes: arguments, refusals, bad gradients, overrides, embeddings, paging."""

import argparse
import gc
import inspect
import warnings

import pytest
import torch

import kbit
import kbit.optim as O
from kbit import KbitTypeError, KbitValueError


@pytest.fixture(autouse=True)
def clean_manager():
    """Overrides are process-wide: every test starts and ends without any."""
    O.GlobalOptimManager.get_instance().initialize()
    yield
    O.GlobalOptimManager.get_instance().initialize()


def _param(numel=5000, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(numel, generator=gen).to(dtype))


def _grad(p, seed=1, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    p.grad = (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)


def _state_copy(optimizer):
    return [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for s in optimizer.state.values()]


def _same_state(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys()
        and all(torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k] for k in x)
        for x, y in zip(a, b, strict=True)
    )


# ------------------------------------------------------------------ constructor checks
@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda ps: O.Adam(ps, lr=-1e-3), "lr"),
        (lambda ps: O.Adam8bit(ps, eps=-1e-8), "eps"),
        (lambda ps: O.Adam(ps, betas=(1.0, 0.999)), r"betas\[0\]"),
        (lambda ps: O.AdamW(ps, betas=(0.9, -0.1)), r"betas\[1\]"),
        (lambda ps: O.Adam(ps, betas=(0.9,)), "betas"),
        (lambda ps: O.Lion(ps, weight_decay=-0.1), "weight_decay"),
        (lambda ps: O.Adam(ps, optim_bits=16), "optim_bits"),
        (lambda ps: O.Adam(ps, percentile_clipping=101), "percentile_clipping"),
        (lambda ps: O.Adam(ps, min_8bit_size=-1), "min_8bit_size"),
        (lambda ps: O.AdEMAMix(ps, alpha=-1.0), "alpha"),
        (lambda ps: O.AdEMAMix(ps, t_beta3=0), "t_beta3"),
        (lambda ps: O.Adam([{"params": ps, "lr": -1.0}]), "lr"),
        (lambda ps: O.Adam(ps, lr=float("inf")), "lr"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(make, fragment):
    with pytest.raises(KbitValueError, match=fragment):
        make([_param()])


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda ps: O.Adam(ps, amsgrad=True), "amsgrad"),
        (lambda ps: O.AdamW8bit(ps, amsgrad=True), "amsgrad"),
        (lambda ps: O.SGD(ps, lr=0.1), "momentum"),
        (lambda ps: O.SGD8bit(ps, lr=0.1, momentum=0.9, nesterov=True), "nesterov"),
        (lambda ps: O.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1), "dampening"),
        (lambda ps: O.RMSprop(ps, centered=True), "centered"),
        (lambda ps: O.RMSprop(ps, momentum=0.9), "momentum"),
        (lambda ps: O.RMSprop(ps, alpha=0.0), "alpha"),
        (lambda ps: O.Adagrad(ps, lr_decay=0.1), "lr_decay"),
        (lambda ps: O.Adagrad(ps, initial_accumulator_value=0.1), "initial_accumulator_value"),
        (lambda ps: O.LAMB(ps, bias_correction=False), "bias_correction"),
        (lambda ps: O.LAMB(ps, adam_w_mode=False), "adam_w_mode"),
        (lambda ps: O.LARS(ps, lr=0.1), "momentum"),
        (lambda ps: O.Adam8bit(ps, max_unorm=1.0), "max_unorm"),
        (lambda ps: O.Adam8bit(ps, block_wise=False, skip_zeros=True), "skip_zeros"),
        (lambda ps: O.AdEMAMix8bit(ps, block_wise=False), "block_wise"),
        (lambda ps: O.Optimizer2State("adam", ps, alpha=1.0), "alpha"),
        (lambda ps: O.Optimizer2State("lion", ps), "optimizer_name"),
        (lambda ps: O.Optimizer1State("momentum", ps, eps=1e-8), "eps"),
        (lambda ps: O.Adam8bit(ps, optim_bits=32), "optim_bits"),
        (lambda ps: O.PagedAdam(ps, is_paged=False), "is_paged"),
        (lambda ps: O.Adam8bit(ps, args=argparse.Namespace(optim_bits=32)), "optim_bits"),
    ],
)
def test_unsupported_arguments_raise_instead_of_being_ignored(make, argument):
    with pytest.raises(KbitValueError, match=argument):
        make([_param()])


def test_supported_combinations_construct():
    p = [_param()]
    O.LAMB8bit(p)  # whole-tensor state by default, so max_unorm works
    O.LARS8bit(p, lr=0.1, momentum=0.9)
    O.Adam8bit(p, block_wise=False, max_unorm=1.0)
    O.Adam32bit(p, max_unorm=1.0, skip_zeros=True)
    O.Optimizer1State("lion", p, betas=(0.9, 0.99), eps=0.0)
    assert O.Adam(p, betas="(0.8, 0.99)").param_groups[0]["betas"] == (0.8, 0.99)


def test_positional_arguments_never_rebind():
    p = [_param()]
    eight = O.Adam(p, 1e-3, (0.9, 0.999), 1e-8, 0.0, False, 8, None, 1000)
    assert eight.args.optim_bits == 8 and eight.args.min_8bit_size == 1000
    with pytest.raises(TypeError):  # percentile_clipping/block_wise/is_paged order differs across releases
        O.Adam(p, 1e-3, (0.9, 0.999), 1e-8, 0.0, False, 8, None, 1000, 100)
    with pytest.raises(TypeError, match="by keyword"):  # Lion8bit's 5th slot is `args` in some releases
        O.Lion8bit(p, 1e-4, (0.9, 0.99), 0.0, None)
    with pytest.raises(TypeError, match="by keyword"):
        O.Adam8bit(p, 1e-3, (0.9, 0.999), 1e-8, 0.0, False, 8)
    signature = inspect.signature(O.PagedAdamW8bit)
    assert list(signature.parameters)[:6] == ["params", "lr", "betas", "eps", "weight_decay", "amsgrad"]
    assert signature.parameters["optim_bits"].kind is inspect.Parameter.KEYWORD_ONLY
    assert signature.parameters["weight_decay"].default == 1e-2


def test_args_object_overrides_keywords():
    args = argparse.Namespace(optim_bits=8, min_8bit_size=100, percentile_clipping=50, block_wise=False,
                              max_unorm=0.0, skip_zeros=False)  # fmt: skip
    p = _param(200)
    opt = O.Adam([p], args=args)
    _grad(p)
    opt.step()
    state = opt.state[p]
    assert state["state1"].dtype == torch.uint8 and "max1" in state and "gnorm_vec" in state


def test_derived_attributes_follow_the_settings_they_come_from():
    p = _param()
    opt = O.Adam([p], optim_bits=8)
    assert opt.optim_bits == 8 and opt.optimizer_name == "adam"
    opt.args.optim_bits = 32  # state options are read at every step, so they may be changed
    assert opt.optim_bits == 32
    _grad(p)
    opt.step()
    assert opt.state[p]["state1"].dtype == torch.float32
    mng = O.GlobalOptimManager.get_instance()
    q = _param(seed=1)
    mng.override_config(q, "lr", 0.0)
    assert mng.uses_config_override
    del q
    gc.collect()
    assert not mng.uses_config_override, "no override is left once its parameter is gone"


def test_every_api_class_is_exported_with_its_variants():
    families = ["Adam", "AdamW", "Adagrad", "LAMB", "LARS", "Lion", "RMSprop", "SGD", "AdEMAMix"]
    for family in families:
        for suffix in ("", "8bit", "32bit"):
            assert issubclass(getattr(O, family + suffix), O.Optimizer8bit)
    for family in ("Adam", "AdamW", "Lion", "AdEMAMix"):
        for suffix in ("", "8bit", "32bit"):
            with pytest.warns(O.KbitPagedMemoryWarning) as caught:
                assert getattr(O, f"Paged{family}{suffix}")([_param()]).is_paged
            assert caught[0].filename == __file__, "the warning points at the user's line"
    assert issubclass(O.Adam, O.Optimizer2State) and issubclass(O.Lion, O.Optimizer1State)
    assert issubclass(O.PytorchLARS, torch.optim.Optimizer)


# ----------------------------------------------------------------------- bad gradients
@pytest.mark.parametrize("cls", [O.Adam8bit, O.Adam32bit, O.LAMB8bit])
def test_nan_gradient_raises_and_changes_nothing(cls):
    p, q = _param(5000), _param(300, seed=2)
    opt = cls([p, q], lr=1e-2)
    _grad(p), _grad(q)
    opt.step()
    params, states = (p.detach().clone(), q.detach().clone()), _state_copy(opt)
    _grad(p, seed=3), _grad(q, seed=4)
    q.grad[7] = float("nan")
    with pytest.raises(KbitValueError, match=r"parameter 1 of group 0: 1 of its \d+ gradient values are NaN or infinite"):
        opt.step()
    assert torch.equal(p, params[0]) and torch.equal(q, params[1]), "no parameter may move"
    assert _same_state(_state_copy(opt), states), "no state may change (not even the step count)"
    q.grad[7] = float("inf")
    with pytest.raises(KbitValueError):
        opt.step()
    q.grad[7] = 0.0  # the caller drops the bad value (or skips the batch) and carries on
    opt.step()
    assert all(torch.isfinite(t).all() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("cls", [O.Adam8bit, O.Adam32bit, O.RMSprop8bit])
def test_a_gradient_whose_square_overflows_float32_raises_like_nan(cls):
    """|g| > 1.8e19 is finite, but g**2 is inf in float32: an 8-bit block's scale would turn
    inf and the next step would write NaN into the parameters of the whole block."""
    p = _param(5000)
    opt = cls([p], lr=1e-2)
    _grad(p)
    opt.step()
    params, states = p.detach().clone(), _state_copy(opt)
    _grad(p, seed=3)
    p.grad[5] = 1e25
    with pytest.raises(KbitValueError, match=r"parameter 0 of group 0: 1 of its 5000 gradient values exceed .*overflow"):
        opt.step()
    assert torch.equal(p, params) and _same_state(_state_copy(opt), states)
    p.grad[5] = 1e18  # large, but its square fits
    opt.step()
    assert all(torch.isfinite(t).all() for t in opt.state[p].values() if isinstance(t, torch.Tensor))
    _grad(p, seed=4)
    opt.step()
    assert torch.isfinite(p).all()


def _bad_group_two(opt, q):
    opt.param_groups[1]["lr"] = -1.0  # edited after construction, as schedulers do


def _bad_override(opt, q):
    O.GlobalOptimManager.get_instance().override_config(q, "eps", -1.0)


def _bad_layout_override(opt, q):
    # max_unorm needs 32-bit or whole-tensor state; q keeps blockwise 8-bit state
    O.GlobalOptimManager.get_instance().override_config(q, "max_unorm", 1.0)


@pytest.mark.parametrize("spoil", [_bad_group_two, _bad_override, _bad_layout_override])
@pytest.mark.parametrize("first_step_done", [False, True])
def test_a_bad_setting_anywhere_raises_before_any_parameter_moves(spoil, first_step_done):
    p, q = _param(5000), _param(5000, seed=2)
    opt = O.Adam8bit([{"params": [p]}, {"params": [q]}], lr=1e-2)
    if first_step_done:
        _grad(p), _grad(q)
        opt.step()
    params, states = (p.detach().clone(), q.detach().clone()), _state_copy(opt)
    spoil(opt, q)
    _grad(p, seed=3), _grad(q, seed=4)
    with pytest.raises(KbitValueError, match="group 1"):
        opt.step()
    assert torch.equal(p, params[0]) and torch.equal(q, params[1]), "group 0 must not be stepped"
    assert _same_state(_state_copy(opt), states), "no state may change (not even the step count)"


def _float64_parameter(q):
    q.data = q.data.double()  # kbit's update ops take float32, float16 and bfloat16 parameters
    _grad(q)


def _gradient_of_another_dtype(q):
    q.data = q.data.bfloat16()
    q.grad_dtype = None  # torch then accepts a float32 gradient for a bfloat16 parameter
    q.grad = torch.randn(q.shape)


@pytest.mark.parametrize("spoil", [_float64_parameter, _gradient_of_another_dtype])
@pytest.mark.parametrize("cls", [O.Adam8bit, O.Adam32bit])
def test_a_parameter_the_update_cannot_take_raises_before_any_parameter_moves(spoil, cls):
    p, q = _param(5000), _param(5000, seed=2)
    opt = cls([p, q], lr=1e-2)
    _grad(p)
    spoil(q)
    before = p.detach().clone()
    with pytest.raises(KbitTypeError, match=r"parameter 1 in group 0.*float"):
        opt.step()
    assert torch.equal(p, before), "parameter 0 must not be stepped when parameter 1 cannot be"
    assert not any(opt.state.values()), "no state may be allocated or counted"


@pytest.mark.parametrize(
    "make",
    [lambda ps: O.Adam32bit(ps), lambda ps: O.Adam8bit(ps, min_8bit_size=0),
     lambda ps: O.Adam(ps, optim_bits=8, min_8bit_size=0, block_wise=False), lambda ps: O.AdEMAMix8bit(ps)],  # fmt: skip
    ids=["Adam32bit", "Adam8bit", "Adam8bit-whole-tensor", "AdEMAMix8bit"],
)
def test_an_empty_parameter_is_stepped_like_torch_optim_does(make):
    """A zero-element parameter (a LoRA rank 0, a pruned head) has nothing to update; torch.optim
    steps it without complaint, so kbit must too, and the other parameters are unaffected."""
    empty, p, alone = torch.nn.Parameter(torch.zeros(0, 16)), _param(), _param()
    opt, opt_alone = make([empty, p]), make([alone])
    for _ in range(2):
        empty.grad = torch.zeros(0, 16)
        _grad(p), _grad(alone)
        opt.step(), opt_alone.step()
    assert torch.equal(p, alone)
    assert opt.state[empty]["step"] == 2 and opt.state[empty]["state1"].dtype == torch.float32
    fresh = make([torch.nn.Parameter(torch.zeros(0, 16)), _param()])
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[fresh.param_groups[0]["params"][0]]["step"] == 2


def test_sparse_gradients_raise_a_typed_error():
    embedding = torch.nn.Embedding(100, 64, sparse=True)
    opt = O.Adam8bit(embedding.parameters())
    embedding(torch.tensor([1, 2, 3])).sum().backward()
    with pytest.raises(KbitTypeError, match="sparse"):
        opt.step()
    assert not opt.state


def test_base_class_without_a_kind_refuses_to_step():
    p = _param()
    opt = O.Optimizer8bit([p], dict(lr=1e-3))
    _grad(p)
    with pytest.raises(NotImplementedError):
        opt.step()


def test_closure_is_evaluated_with_gradients_enabled():
    p = _param(10)
    opt = O.Adam([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() > 0 and opt.state[p]["step"] == 1


# ------------------------------------------------------------- max_unorm and skip_zeros
@pytest.mark.parametrize(
    "make",
    [lambda ps, **kw: O.Adam32bit(ps, **kw), lambda ps, **kw: O.Adam8bit(ps, block_wise=False, **kw),
     lambda ps, **kw: O.RMSprop32bit(ps, **kw)],  # fmt: skip
    ids=["Adam32bit", "Adam8bit-whole-tensor", "RMSprop32bit"],
)
def test_max_unorm_clips_the_update_of_every_kind_that_accepts_it(make):
    """The update (before ``lr``) is scaled down to ``max_unorm * ||p||`` where it would be
    longer, and left alone where it is shorter: the optimizer passes the setting through."""
    for max_unorm, binds in ((1e-3, True), (100.0, False)):
        clipped, free = _param(), _param()
        opt_clipped, opt_free = make([clipped], lr=0.1, max_unorm=max_unorm), make([free], lr=0.1)
        start = clipped.detach().clone()
        for p, opt in ((clipped, opt_clipped), (free, opt_free)):
            _grad(p)
            opt.step()
        moved = float((clipped.detach() - start).norm())
        if binds:
            assert moved == pytest.approx(0.1 * max_unorm * float(start.norm()), rel=1e-3)
            assert float((free.detach() - start).norm()) > 10 * moved
        else:
            torch.testing.assert_close(clipped, free, rtol=1e-6, atol=1e-6)
        assert "unorm_vec" in opt_clipped.state[clipped]


@pytest.mark.parametrize("cls", [O.Adam32bit, O.Adam8bit, O.AdEMAMix8bit])
def test_skip_zeros_leaves_parameters_with_a_zero_gradient_in_place(cls):
    p = _param()
    opt = cls([p], lr=1e-2, skip_zeros=True)
    _grad(p)
    opt.step()
    before = p.detach().clone()
    _grad(p, seed=2)
    p.grad[:300] = 0
    opt.step()
    assert torch.equal(p[:300], before[:300]), "zero-gradient elements must not move (momentum would move them)"
    assert bool((p[300:] != before[300:]).all())


# ------------------------------------------------------------------ percentile clipping
def _unit_grad(p, seed):
    _grad(p, seed)
    p.grad /= p.grad.norm()


def test_percentile_clipping_scales_a_spike_down_and_100_turns_it_off():
    clipped, unclipped, manual = _param(), _param(), _param()
    opt_clipped = O.SGD32bit([clipped], lr=0.1, momentum=0.9, percentile_clipping=5)
    opt_off = O.SGD32bit([unclipped], lr=0.1, momentum=0.9)  # percentile_clipping=100
    opt_manual = O.SGD32bit([manual], lr=0.1, momentum=0.9)
    for step in range(10):
        for p in (clipped, unclipped, manual):
            _unit_grad(p, step)  # every norm is 1: nothing to clip
        for opt in (opt_clipped, opt_off, opt_manual):
            opt.step()
    assert torch.allclose(clipped, unclipped, rtol=0, atol=1e-6)
    for p in (clipped, unclipped, manual):
        _unit_grad(p, 99)
        p.grad *= 1000
    manual.grad /= 1000  # the clip value is the 5th percentile of the history: 1
    for opt in (opt_clipped, opt_off, opt_manual):
        opt.step()
    torch.testing.assert_close(clipped, manual, rtol=1e-6, atol=1e-6)
    assert (unclipped - clipped).abs().max() > 1.0, "without clipping the spike must move the parameter"
    assert "gnorm_vec" in opt_clipped.state[clipped] and "gnorm_vec" not in opt_off.state[unclipped]


# ----------------------------------------------------------------- GlobalOptimManager
def test_manager_is_a_singleton():
    assert O.GlobalOptimManager.get_instance() is O.GlobalOptimManager.get_instance()
    with pytest.raises(RuntimeError):
        O.GlobalOptimManager()


def test_override_config_gives_one_parameter_32bit_state():
    big, other = _param(8192), _param(8192, seed=3)
    mng = O.GlobalOptimManager.get_instance()
    mng.override_config(big, "optim_bits", 32)
    opt = O.Adam8bit([big, other])
    _grad(big), _grad(other)
    opt.step()
    assert opt.state[big]["state1"].dtype == torch.float32
    assert opt.state[other]["state1"].dtype == torch.uint8


def test_registered_positions_survive_replacing_the_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.Linear(100, 100))
    mng = O.GlobalOptimManager.get_instance()
    mng.override_config(model[1].weight, key_value_dict={"optim_bits": 32, "lr": 0.0})
    mng.register_parameters(model.parameters())
    # "Moving" the model makes new parameter objects: only the position still identifies them.
    for layer in model:
        layer.weight = torch.nn.Parameter(layer.weight.detach().clone())
    opt = O.Adam8bit(model.parameters(), lr=1e-2)
    before = model[1].weight.detach().clone()
    for p in model.parameters():
        _grad(p)
    opt.step()
    assert opt.state[model[1].weight]["state1"].dtype == torch.float32
    assert torch.equal(model[1].weight, before), "lr=0 override applies to the moved parameter"
    assert opt.state[model[0].weight]["state1"].dtype == torch.uint8


def test_overrides_are_validated():
    p = _param()
    mng = O.GlobalOptimManager.get_instance()
    with pytest.raises(KbitValueError, match="config"):
        mng.override_config(p, "learning_rate", 0.1)
    with pytest.raises(KbitValueError):
        mng.override_config(p)
    mng.override_config(p, "optim_bits", 16)
    opt = O.Adam8bit([p])
    _grad(p)
    with pytest.raises(KbitValueError, match="optim_bits"):
        opt.step()


def test_stable_embedding_weight_keeps_32bit_state_in_an_8bit_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(kbit.nn.StableEmbedding(1000, 64), torch.nn.Linear(64, 128))
    opt = O.Adam8bit(model.parameters())
    model(torch.randint(0, 1000, (4, 7))).sum().backward()
    opt.step()
    assert opt.state[model[0].weight]["state1"].dtype == torch.float32
    assert opt.state[model[1].weight]["state1"].dtype == torch.uint8
    assert opt.state[model[0].norm.weight]["state1"].dtype == torch.float32  # small anyway


def test_an_embedding_created_after_the_optimizer_is_still_honoured():
    embedding = kbit.nn.Embedding(1000, 64)
    opt = O.Adam8bit(embedding.parameters())
    # module overrides are resolved at the first step, not at construction
    embedding(torch.tensor([1, 2])).sum().backward()
    opt.step()
    assert opt.state[embedding.weight]["state1"].dtype == torch.float32


def test_embeddings_initialise_like_bitsandbytes():
    torch.manual_seed(0)
    stable = kbit.nn.StableEmbedding(500, 32, padding_idx=0)
    bound = (6 / (500 + 32)) ** 0.5  # Xavier uniform
    assert stable.weight.abs().max() <= bound and stable.weight.abs().max() > 0.9 * bound
    assert torch.all(stable.weight[0] == 0)
    out = stable(torch.tensor([[1, 2, 3]]))
    torch.testing.assert_close(out.mean(-1), torch.zeros(1, 3), atol=1e-5, rtol=0)  # layer-normalised
    plain = kbit.nn.Embedding(500, 32)
    assert not hasattr(plain, "norm") and plain.weight.abs().max() <= bound
    half = kbit.nn.StableEmbedding(10, 8, dtype=torch.bfloat16)
    assert half(torch.tensor([1])).dtype == torch.bfloat16


def test_module_overrides_do_not_keep_modules_alive():
    mng = O.GlobalOptimManager.get_instance()
    embedding = kbit.nn.StableEmbedding(10, 4)
    assert any(module is embedding for module, _, _ in mng.module_weight_config_triple)
    del embedding
    gc.collect()
    assert mng.module_weight_config_triple == []


def test_overrides_of_dead_parameters_are_pruned():
    mng = O.GlobalOptimManager.get_instance()
    p, kept = _param(), _param(seed=1)
    mng.override_config([p, kept], "optim_bits", 32)
    dead = id(p)
    del p
    gc.collect()
    # An id can be reused by a new tensor; a stale entry would hand it the dead one's settings.
    assert dead not in mng.pid2config and id(kept) in mng.pid2config
    embedding = kbit.nn.StableEmbedding(10, 4)
    del embedding
    gc.collect()
    kbit.nn.StableEmbedding(10, 4)  # registering prunes the dead module's entry
    assert len(mng._module_overrides) == 1


def test_module_overrides_registered_after_initialize_reach_an_existing_optimizer():
    first, second = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    mng = O.GlobalOptimManager.get_instance()
    mng.register_module_override(first, "weight", {"optim_bits": 32})
    opt = O.Adam8bit([first.weight, second.weight])
    _grad(first.weight)
    opt.step()
    assert opt.state[first.weight]["state1"].dtype == torch.float32
    mng.initialize()  # forget everything, then register as many overrides as before
    mng.register_module_override(second, "weight", {"optim_bits": 32})
    _grad(second.weight)
    opt.step()
    assert opt.state[second.weight]["state1"].dtype == torch.float32, "the new override must be seen"


# ------------------------------------------------------------------------------ paging
def test_paged_optimizer_on_the_reference_backend_warns_once_and_matches_unpaged():
    p_paged, p_plain = _param(), _param()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paged = O.PagedAdam8bit([p_paged], lr=1e-2)
        plain = O.Adam8bit([p_plain], lr=1e-2)
        for step in range(3):
            _grad(p_paged, step), _grad(p_plain, step)
            paged.step(), plain.step()
    paging = [w for w in caught if issubclass(w.category, O.KbitPagedMemoryWarning)]
    assert len(paging) == 1 and "reference" in str(paging[0].message)
    assert torch.equal(p_paged, p_plain)


def test_the_paged_memory_warning_is_a_top_level_kbit_warning():
    from kbit._errors import KbitPagedMemoryWarning

    assert kbit.KbitPagedMemoryWarning is KbitPagedMemoryWarning is O.KbitPagedMemoryWarning
    assert "KbitPagedMemoryWarning" in kbit.__all__
    assert issubclass(KbitPagedMemoryWarning, kbit.KbitWarning)
    with pytest.warns(kbit.KbitPagedMemoryWarning):
        O.PagedAdam([_param()])


# A paged-memory backend named ``{name}`` serving ``{ops}`` (a Python expression over the
# reference manifest's ops).
PAGED_PLUGIN = """
import torch
from kbit.backend import API_VERSION, BackendManifest
from kbit_reference._manifest import MANIFEST as REFERENCE
from kbit_reference.backend import ReferenceBackend

ALLOCATED = []

class PagedBackend(ReferenceBackend):
    def paged_zeros(self, shape, dtype, device):
        ALLOCATED.append((tuple(shape), dtype))
        return torch.zeros(shape, dtype=dtype, device=device)

MANIFEST = BackendManifest(
    name="{name}", api_version=API_VERSION, priority=10, device_types=("cpu",),
    factory="{name}_pkg.manifest:PagedBackend",
    ops={ops},
    features=("paged_memory",),
)
"""


def test_a_backend_with_paged_memory_allocates_the_state(make_plugin):
    ops = '{k: v for k, v in REFERENCE.ops.items() if k.startswith(("optimizer", "percentile"))}'
    make_plugin("pagedref", "pagedref", PAGED_PLUGIN.format(name="pagedref", ops=ops))
    import pagedref_pkg.manifest as plugin

    p = _param()
    with warnings.catch_warnings():
        warnings.simplefilter("error", O.KbitPagedMemoryWarning)
        opt = O.PagedAdamW8bit([p])
    _grad(p)
    opt.step()
    assert plugin.ALLOCATED == [((5000,), torch.uint8), ((5000,), torch.uint8)]
    assert kbit.backends.resolve("optimizer_update_8bit_blockwise", "cpu", "float32", optimizer="adam").name == "pagedref"
    # A resumed run pages its state too: the checkpoint's tensors are copied into paged ones.
    plugin.ALLOCATED.clear()
    resumed = O.PagedAdamW8bit([_param(seed=5)])
    resumed.load_state_dict(opt.state_dict())
    assert plugin.ALLOCATED == [((5000,), torch.uint8), ((5000,), torch.uint8)]
    loaded = next(iter(resumed.state.values()))
    assert torch.equal(loaded["state1"], opt.state[p]["state1"]) and torch.equal(loaded["state2"], opt.state[p]["state2"])


@pytest.mark.parametrize(
    "op, make, numel, dtype",
    [
        ("optimizer_update_8bit", lambda ps: O.PagedAdam8bit(ps, block_wise=False), 5000, torch.uint8),
        ("optimizer_update_32bit", lambda ps: O.PagedAdam8bit(ps), 1000, torch.float32),  # below min_8bit_size
    ],
    ids=["whole-tensor-8bit", "small-parameter-32bit"],
)
def test_paging_asks_the_registry_about_the_op_the_state_is_updated_with(make_plugin, op, make, numel, dtype):
    name = op.replace("optimizer_update_", "paged")
    make_plugin(name, name, PAGED_PLUGIN.format(name=name, ops=f'{{"{op}": REFERENCE.ops["{op}"]}}'))
    plugin = __import__(f"{name}_pkg.manifest", fromlist=["ALLOCATED"])
    p = _param(numel)
    with warnings.catch_warnings():
        warnings.simplefilter("error", O.KbitPagedMemoryWarning)
        opt = make([p])
    _grad(p)
    opt.step()
    assert plugin.ALLOCATED == [((numel,), dtype), ((numel,), dtype)]


@pytest.mark.parametrize("make", [O.PagedAdam8bit, O.PagedLion32bit])
def test_a_named_backend_that_is_missing_raises_instead_of_running_unpaged(make):
    with kbit.backends.use_backend("no-such-backend"), pytest.raises(kbit.BackendNotFoundError, match="no-such-backend"):
        make([_param()])


def test_every_public_optimizer_class_is_an_explicit_class_statement():
    """``grep "class Adam8bit"`` finds every public optimizer class: variants are class
    statements with class keywords, not factory calls."""
    import inspect
    import re

    for name in O.__all__:
        obj = getattr(O, name)
        if not (isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer)):
            continue
        source = inspect.getsource(inspect.getmodule(obj))
        assert re.search(rf"^class {name}\b", source, re.M), f"no `class {name}` statement in {obj.__module__}"


@pytest.mark.parametrize("cls", [O.Adam, O.AdamW, O.Lion, O.SGD, O.LAMB, O.RMSprop, O.Adagrad, O.LARS, O.AdEMAMix])
def test_too_many_positional_arguments_name_the_keyword_to_use(cls):
    """Options after ``min_8bit_size`` are keyword-only; the TypeError says which keyword."""
    import inspect

    parameters = list(inspect.signature(cls).parameters.values())
    positional = [p for p in parameters if p.kind == p.POSITIONAL_OR_KEYWORD]
    first_keyword = next(p.name for p in parameters if p.kind == p.KEYWORD_ONLY)
    args = [[torch.nn.Parameter(torch.zeros(3))]] + [p.default for p in positional[1:]] + [100]
    with pytest.raises(TypeError, match=rf"pass '{first_keyword}' and later arguments by keyword"):
        cls(*args)
