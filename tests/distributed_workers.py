"""What each rank runs in the multi-process tests (``tests/test_distributed.py``).

The processes are spawned, so these functions live at module level in a module that
imports nothing heavier than torch and kbit. Each one builds its tiny models from fixed
seeds, computes the single-process reference itself (every rank can: the models are tiny)
and returns plain numbers and flags; the assertions are made in the test process, where a
failure reads like any other test failure.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

import kbit
from kbit._demo._data import PermutationTask
from kbit._demo._model import LoRA, ModelConfig, TinyLM, to_qlora

#: The model every worker trains: two blocks of 4-bit linears with LoRA adapters.
CONFIG = ModelConfig(vocab_size=32, d_model=64, n_heads=2, n_layers=2, d_ff=256, seq_len=16, lora_rank=8)

#: 4-bit settings the FSDP checks run: (quant_type, nested absmax, quant_storage).
FOUR_BIT_SETTINGS = {
    "nf4-nested-uint8": ("nf4", True, torch.uint8),
    "fp4-plain-uint8": ("fp4", False, torch.uint8),
    "nf4-nested-bfloat16": ("nf4", True, torch.bfloat16),
    "fp4-nested-float32": ("fp4", True, torch.float32),
}


def qlora_model(device: str, seed: int = 0, settings: str = "nf4-nested-uint8") -> TinyLM:
    """The test model, identical on every rank (same seed), with quantized base weights."""
    quant_type, nested, storage = FOUR_BIT_SETTINGS[settings]
    torch.manual_seed(seed)
    model = to_qlora(TinyLM(CONFIG), torch.device(device), CONFIG.lora_rank, quant_type=quant_type,
                     compress_statistics=nested, quant_storage=storage)  # fmt: skip
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRA):
                # Not zero as in QLoRA: the trust ratio of LAMB and LARS (max_unorm * ||p||)
                # would keep B at zero, and A gets no gradient while B is zero.
                module.lora_b.normal_(std=0.02)
    return model


def shard(model: TinyLM, device: str, **options: Any) -> TinyLM:
    """FSDP2 over ``model``: one unit per block and one for the rest, on a 1-D mesh of every rank."""
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **options)
    return model


def batch(step: int, size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: the same on every rank."""
    task = PermutationTask(CONFIG.vocab_size, CONFIG.seq_len, seed=1)
    task.generator.manual_seed(1000 + step)
    return task.batch(size, torch.device(device))


def loss_of(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy."""
    logits = model(inputs)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def trainable(model: torch.nn.Module) -> list[torch.Tensor]:
    """The LoRA parameters, in registration order (FSDP keeps it)."""
    return [p for p in model.parameters() if p.requires_grad]


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a possibly sharded tensor, on the CPU."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (packed 4-bit codes stored as floats may look like NaN)."""
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _error_of(action: Callable[[], Any]) -> str:
    try:
        action()
    except Exception as exc:  # the test checks the type and the message
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _code_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """Bytes of 4-bit codes this rank holds, and of the per-block scales beside them.

    (The code tables and the JSON of each layer's quant state, about 1.3 KB per layer
    whatever its size, are left out: they do not grow with the model.)
    """
    codes = scales = 0
    for module in model.modules():
        if isinstance(module, kbit.nn.Linear4bit):
            local = module.weight.to_local() if isinstance(module.weight, DTensor) else module.weight
            codes += local.numel() * local.element_size()
            state = module.quant_state
            scales += state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                scales += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return codes, scales


# --------------------------------------------------------------------------- FSDP2 models
def fsdp_4bit_worker(rank: int, world_size: int, device: str) -> dict[str, Any]:
    """FSDP2 over 4-bit layers with LoRA, per 4-bit setting: sharding, forward/backward, state dicts."""
    results: dict[str, Any] = {}
    inputs, targets = batch(0, 4, device)
    for name in FOUR_BIT_SETTINGS:
        model = qlora_model(device, settings=name)
        reference = copy.deepcopy(model)
        full_codes, _ = _code_bytes(model)
        shard(model, device)
        local_codes, scale_bytes = _code_bytes(model)
        out: dict[str, Any] = {"full_code_bytes": full_codes, "local_code_bytes": local_codes, "scale_bytes": scale_bytes}
        # Twice: the second forward gathers again into the storage FSDP freed after the first.
        logits = [model(inputs) for _ in range(2)]
        expected = reference(inputs)
        out["forward_equal"] = all(torch.equal(found, expected) for found in logits)
        loss_of(model, inputs, targets).backward()
        loss_of(reference, inputs, targets).backward()
        out["grads_equal"] = all(
            torch.equal(full(p.grad), q.grad.cpu()) for p, q in zip(trainable(model), trainable(reference), strict=True)
        )
        expected_state = reference.state_dict()
        for offload in (False, True):
            found = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
            if offload and rank != 0:
                continue  # a full state dict offloaded to the CPU lands on rank 0 only
            out[f"full_state_dict_keys_equal_offload={offload}"] = sorted(found) == sorted(expected_state)
            out[f"full_state_dict_equal_offload={offload}"] = all(
                same_bytes(found[key], expected_state[key]) for key in expected_state if key in found
            )
        sharded = get_model_state_dict(model, options=StateDictOptions(cpu_offload=True))
        out["sharded_weight_types"] = sorted({type(v).__name__ for k, v in sharded.items() if k.endswith(".weight")})
        out["sharded_absmax_types"] = sorted({type(v).__name__ for k, v in sharded.items() if k.endswith(".absmax")})
        # Load the single-process state dict back (after disturbing the adapters and codes).
        with torch.no_grad():
            for p in trainable(model):
                p.add_(1.0)
        set_model_state_dict(model, expected_state, options=StateDictOptions(full_state_dict=True))
        out["forward_equal_after_load"] = torch.equal(model(inputs), expected)
        results[name] = out

    # A 4-bit embedding table shards the same way.
    torch.manual_seed(0)
    table = torch.nn.Sequential(kbit.nn.EmbeddingNF4(CONFIG.vocab_size, 64)).to(device)
    expected = copy.deepcopy(table)(inputs)
    mesh = init_device_mesh(torch.device(device).type, (world_size,))
    fully_shard(table, mesh=mesh)
    results["embedding_equal"] = torch.equal(table(inputs), expected)
    # Codes stored as float32 would be cast by a mixed-precision policy: refused, by name.
    model = shard(qlora_model(device, settings="fp4-nested-float32"), device,
                  mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))  # fmt: skip
    results["float_storage_cast_error"] = _error_of(lambda: model(inputs))
    # uint8 codes are not floating point: the policy leaves them alone.
    model = shard(qlora_model(device), device, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    results["uint8_mixed_precision_finite"] = bool(torch.isfinite(model(inputs)).all())
    # A model whose 4-bit weights were never quantized cannot be sharded.
    unquantized = torch.nn.Sequential(kbit.nn.LinearNF4(16, 16, device=device))
    mesh = init_device_mesh(torch.device(device).type, (world_size,))
    results["unquantized_error"] = _error_of(lambda: fully_shard(unquantized, mesh=mesh))
    return results


# ------------------------------------------------------------------------------ training
#: Global batch of every training step; each of the ranks takes an equal slice of it.
GLOBAL_BATCH = 8
#: Learning rate of the parity runs (large enough that 20 steps move the adapters visibly).
LEARNING_RATE = 1e-2


def optimizer_names() -> list[str]:
    """Every kbit optimizer class (paged variants included)."""
    return [name for name in kbit.optim.__all__ if name not in ("Optimizer8bit", "Optimizer1State",
            "Optimizer2State", "GlobalOptimManager", "KbitPagedMemoryWarning")]  # fmt: skip


def make_optimizer(name: str, params: list[torch.Tensor], **options: Any) -> torch.optim.Optimizer:
    """``kbit.optim.<name>`` over ``params``; 8-bit state for every parameter (the adapters are small)."""
    cls = getattr(kbit.optim, name)
    if issubclass(cls, kbit.optim.Optimizer8bit):
        options.setdefault("min_8bit_size", 0)
    if name.startswith(("SGD", "LARS")):
        options.setdefault("momentum", 0.9)  # they keep no state without it
    return cls(params, lr=LEARNING_RATE, **options)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, device: str,
          start: int = 0) -> list[float]:  # fmt: skip
    """``steps`` steps on this rank's slice of each global batch; returns this rank's losses."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    per_rank = GLOBAL_BATCH // world_size
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    losses = []
    for step in range(start, start + steps):
        inputs, targets = batch(step, GLOBAL_BATCH, device)
        loss = loss_of(model, inputs[part], targets[part])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def train_alone(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, device: str, *,
                slices: int = 1, start: int = 0) -> list[float]:  # fmt: skip
    """The single-process run of the same global batches.

    ``slices=1`` computes each step's gradient on the whole global batch. ``slices=N``
    accumulates it over the N rank slices, each loss divided by N: the sums a data-parallel
    all-reduce or reduce-scatter of N ranks performs, in the same order, so 32-bit training
    can match it bit for bit.
    """
    per_slice = GLOBAL_BATCH // slices
    losses = []
    for step in range(start, start + steps):
        inputs, targets = batch(step, GLOBAL_BATCH, device)
        total = 0.0
        for index in range(slices):
            part = slice(index * per_slice, (index + 1) * per_slice)
            loss = loss_of(model, inputs[part], targets[part]) / slices
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def max_difference(params: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """Largest absolute difference between the (possibly sharded) ``params`` and ``expected``."""
    return max(float((full(p) - q.detach().cpu()).abs().max()) for p, q in zip(params, expected, strict=True))


def _parity(wrap: Callable[[torch.nn.Module], torch.nn.Module], name: str, steps: int, device: str,
            references: tuple[int, ...] = (1, 2)) -> dict[str, float]:  # fmt: skip
    """Train a wrapped model and single-process twins; the largest parameter differences.

    Keys ``"slices=N"``: against the single-process run accumulating N slices (N = 1: the
    whole global batch at once). ``"moved"``: how far training moved the parameters.
    """
    model = qlora_model(device)
    start = [p.detach().clone() for p in trainable(model)]
    twins = {slices: copy.deepcopy(model) for slices in references}
    model = wrap(model)
    train(model, make_optimizer(name, trainable(model)), steps, device)
    found = {"moved": max_difference(trainable(model), start)}
    for slices, twin in twins.items():
        train_alone(twin, make_optimizer(name, trainable(twin)), steps, device, slices=slices)
        found[f"slices={slices}"] = max_difference(trainable(model), trainable(twin))
    return found


def ddp_worker(rank: int, world_size: int, device: str) -> dict[str, Any]:
    """DDP over the 4-bit model: 20 steps of Adam and Adam8bit, a few of every optimizer."""
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        return DistributedDataParallel(model, device_ids=[rank] if device == "cuda" else None)

    results: dict[str, Any] = {"long": {}, "all": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kbit.KbitPagedMemoryWarning)
        for name in ("Adam", "Adam8bit"):
            results["long"][name] = _parity(wrap, name, 20, device)
        # Replicated parameters: the optimizers see plain tensors, one family each is enough.
        for name in optimizer_names():
            if name.endswith("8bit") and not name.startswith("Paged"):
                results["all"][name] = _parity(wrap, name, 3, device, references=(2,))
    model = wrap(qlora_model(device))
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    expected = qlora_model(device).state_dict()
    results["state_dict_equal"] = sorted(state) == sorted(expected) and all(
        same_bytes(state[key], expected[key]) for key in expected
    )
    return results


def _state_layouts(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Per parameter: how its state is placed and the share of it this rank holds."""
    layouts = []
    for p, state in optimizer.state.items():
        found = {}
        for key in ("state1", "absmax1"):
            value = state.get(key)
            if isinstance(value, DTensor):
                found[key] = [str(placement) for placement in value.placements]
                found[f"{key}_share"] = value.to_local().numel() / value.numel()
        layouts.append(found)
    return layouts


def _misaligned_parity(name: str, device: str) -> dict[str, Any]:
    """A parameter whose shards end inside an 8-bit block (10 x 30 on 2 ranks: 150 elements each)."""

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(30, 10, bias=False)).to(device)

    inputs = torch.randn(GLOBAL_BATCH, 30, generator=torch.Generator().manual_seed(5)).to(device)
    per_rank = GLOBAL_BATCH // dist.get_world_size()
    mine = inputs[dist.get_rank() * per_rank : (dist.get_rank() + 1) * per_rank]
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    model, twin = fully_shard(build(), mesh=mesh), build()
    optimizer, twin_optimizer = make_optimizer(name, list(model.parameters())), make_optimizer(name, list(twin.parameters()))
    for _ in range(3):
        model(mine).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        for index in range(dist.get_world_size()):
            (twin(inputs[index * per_rank : (index + 1) * per_rank]).pow(2).mean() / dist.get_world_size()).backward()
        twin_optimizer.step()
        twin_optimizer.zero_grad()
    return {"difference": max_difference(list(model.parameters()), list(twin.parameters())),
            "layouts": _state_layouts(optimizer)}  # fmt: skip


def fsdp_train_worker(rank: int, world_size: int, device: str) -> dict[str, Any]:
    """FSDP2 training: 20 steps of Adam and Adam8bit, a few of every kbit optimizer."""
    import warnings

    results: dict[str, Any] = {"long": {}, "all": {}, "layouts": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kbit.KbitPagedMemoryWarning)
        for name in ("Adam", "Adam8bit"):
            results["long"][name] = _parity(lambda model: shard(model, device), name, 20, device)
        for name in optimizer_names():
            results["all"][name] = _parity(lambda model: shard(model, device), name, 3, device, references=(2,))
    for name in ("Adam8bit", "Adam", "LAMB8bit"):
        model = shard(qlora_model(device), device)
        optimizer = make_optimizer(name, trainable(model))
        train(model, optimizer, 1, device)
        results["layouts"][name] = _state_layouts(optimizer)
    results["misaligned"] = _misaligned_parity("Adam8bit", device)
    results["nan_on_one_rank"] = _nan_on_one_rank(device)
    return results


def _nan_on_one_rank(device: str) -> dict[str, Any]:
    """A NaN in rank 1's shard of one gradient: every rank refuses the step, none moves."""
    model = shard(qlora_model(device), device)
    optimizer = make_optimizer("Adam8bit", trainable(model))
    train(model, optimizer, 1, device)
    before = [full(p) for p in trainable(model)]
    inputs, targets = batch(1, GLOBAL_BATCH, device)
    loss_of(model, inputs, targets).backward()
    if dist.get_rank() == 1:
        trainable(model)[3].grad.to_local().view(-1)[0] = float("nan")
    error = _error_of(optimizer.step)
    unchanged = all(torch.equal(full(p), q) for p, q in zip(trainable(model), before, strict=True))
    optimizer.zero_grad()
    train(model, optimizer, 1, device, start=2)  # and the next clean step goes through
    return {"error": error, "unchanged": unchanged,
            "moved_after": max_difference(trainable(model), before) > 0}  # fmt: skip


# -------------------------------------------------------------------------- checkpoints
#: Steps before the checkpoint; the test compares the step after it.
STEPS_BEFORE_SAVE = 3


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **options: Any) -> dict[str, Any]:
    return {
        "model": get_model_state_dict(model, options=StateDictOptions(**options)),
        "optim": get_optimizer_state_dict(model, optimizer, options=StateDictOptions(**options)),
    }


def _save(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str, group: Any = None,
          cpu_offload: bool = False) -> None:  # fmt: skip
    dcp.save(_state(model, optimizer, cpu_offload=cpu_offload), checkpoint_id=path, process_group=group)


def _load(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str, group: Any = None) -> None:
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=path, process_group=group)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])


def _mesh_of(group: Any, device: str) -> Any:
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(group, torch.device(device).type)


def _one_rank_model(model: torch.nn.Module, device: str, group: Any) -> torch.nn.Module:
    """``model`` under FSDP2 on a mesh of this rank alone (a world size of 1)."""
    mesh = _mesh_of(group, device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def fresh_model(device: str) -> TinyLM:
    """The model a resumed job starts from: the same 4-bit base weights (they are frozen and
    rebuilt from the same base checkpoint), other adapter values (the checkpoint restores them)."""
    model = qlora_model(device)
    generator = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for p in trainable(model):
            p.copy_(torch.randn(p.shape, generator=generator))
    return model


def _step_alone(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, device: str) -> None:
    """One step of the global batch on one process, accumulated over the 2 rank slices
    (how a job keeps its global batch on fewer ranks)."""
    train_alone(model, optimizer, 1, device, slices=2, start=step)


def dcp_worker(rank: int, world_size: int, device: str, directory: str, names: tuple[str, ...]) -> dict[str, Any]:
    """:func:`dcp_round_trips` for each optimizer of ``names``."""
    import os
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kbit.KbitPagedMemoryWarning)
        return {name: dcp_round_trips(rank, device, os.path.join(directory, name), name) for name in names}


def dcp_round_trips(rank: int, device: str, directory: str, name: str) -> dict[str, Any]:
    """DCP round trips of model and optimizer: 2 -> 2, 2 -> 1 (also into a plain model), 1 -> 2.

    Every resumed run takes step ``STEPS_BEFORE_SAVE + 1`` and is compared with the
    uninterrupted single-process run (accumulating the 2 rank slices, which the 2-rank
    runs match bit for bit).
    """
    import os

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    os.makedirs(directory, exist_ok=True)
    results: dict[str, Any] = {}
    alone_group = dist.new_group([0])  # every rank must create it; rank 0 then runs alone on it
    # The uninterrupted run.
    reference = qlora_model(device)
    reference_optimizer = make_optimizer(name, trainable(reference))
    train_alone(reference, reference_optimizer, STEPS_BEFORE_SAVE, device, slices=2)
    # A copy: the state dict of a plain optimizer holds its live state tensors.
    saved_reference_optimizer = copy.deepcopy(
        get_optimizer_state_dict(reference, reference_optimizer, options=StateDictOptions(full_state_dict=True))
    )
    train_alone(reference, reference_optimizer, 1, device, slices=2, start=STEPS_BEFORE_SAVE)
    expected = [q.detach().cpu() for q in trainable(reference)]

    # 2 ranks train and save (cpu_offload on the model and optimizer state dicts).
    model = shard(qlora_model(device), device)
    optimizer = make_optimizer(name, trainable(model))
    train(model, optimizer, STEPS_BEFORE_SAVE, device)
    two = os.path.join(directory, "two-ranks")
    _save(model, optimizer, two, cpu_offload=True)
    saved = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    results["full_optimizer_state_differences"] = nested_differences(saved, saved_reference_optimizer)

    # 2 -> 2.
    model = shard(fresh_model(device), device)
    optimizer = make_optimizer(name, trainable(model))
    _load(model, optimizer, two)
    train(model, optimizer, 1, device, start=STEPS_BEFORE_SAVE)
    results["2->2"] = max_difference(trainable(model), expected)

    if rank == 0:
        # 2 -> 1, under FSDP2 on this rank alone ...
        model = _one_rank_model(fresh_model(device), device, alone_group)
        optimizer = make_optimizer(name, trainable(model))
        _load(model, optimizer, two, group=alone_group)
        _step_alone(model, optimizer, STEPS_BEFORE_SAVE, device)
        results["2->1"] = max_difference(trainable(model), expected)
        # ... and into a plain model with load_state_dict, from the checkpoint as one torch.save file.
        flat = os.path.join(directory, "two-ranks.pt")
        dcp_to_torch_save(two, flat)
        loaded = torch.load(flat, weights_only=False)
        model = fresh_model(device)
        model.load_state_dict(loaded["model"])
        optimizer = make_optimizer(name, trainable(model))
        set_optimizer_state_dict(model, optimizer, loaded["optim"])
        _step_alone(model, optimizer, STEPS_BEFORE_SAVE, device)
        results["2->plain"] = max_difference(trainable(model), expected)
        # 1 -> 2: this rank trains alone and saves.
        model = _one_rank_model(qlora_model(device), device, alone_group)
        optimizer = make_optimizer(name, trainable(model))
        for step in range(STEPS_BEFORE_SAVE):
            _step_alone(model, optimizer, step, device)
        _save(model, optimizer, os.path.join(directory, "one-rank"), group=alone_group)
    dist.barrier()
    model = shard(fresh_model(device), device)
    optimizer = make_optimizer(name, trainable(model))
    _load(model, optimizer, os.path.join(directory, "one-rank"))
    train(model, optimizer, 1, device, start=STEPS_BEFORE_SAVE)
    results["1->2"] = max_difference(trainable(model), expected)
    return results


def nested_differences(found: Any, expected: Any, path: str = "") -> list[str]:
    """Where ``found`` differs from ``expected`` (structure, values; tensors bit for bit, DTensors whole)."""
    if isinstance(expected, dict):
        if not isinstance(found, dict) or sorted(map(str, found)) != sorted(map(str, expected)):
            return [f"{path}: keys {sorted(map(str, found)) if isinstance(found, dict) else type(found).__name__}"]
        return [d for key in expected for d in nested_differences(found[key], expected[key], f"{path}/{key}")]
    if isinstance(expected, (list, tuple)):
        if not isinstance(found, (list, tuple)) or len(found) != len(expected):
            return [f"{path}: {found!r}"]
        return [d for i, (a, b) in enumerate(zip(found, expected)) for d in nested_differences(a, b, f"{path}[{i}]")]
    if isinstance(expected, torch.Tensor):
        ok = isinstance(found, torch.Tensor) and same_bytes(full(found), full(expected))
        return [] if ok else [f"{path}: tensor differs"]
    return [] if found == expected else [f"{path}: {found!r} != {expected!r}"]


# ------------------------------------------------------------------------- the launcher
def rank_and_size(rank: int, world_size: int) -> dict[str, int]:
    """What run_ranks hands a rank, and what the process group says."""
    return {"rank": rank, "world_size": world_size, "group_rank": dist.get_rank(), "group_size": dist.get_world_size()}


def hang_on_rank_1(rank: int, world_size: int) -> None:
    """Rank 1 never joins the collective rank 0 waits in."""
    import time

    if rank == 1:
        time.sleep(3600)
    dist.barrier()


def fail_on_rank_1(rank: int, world_size: int) -> None:
    """Rank 1 raises while rank 0 waits for it."""
    if rank == 1:
        raise ValueError("rank 1 gives up")
    dist.barrier()
