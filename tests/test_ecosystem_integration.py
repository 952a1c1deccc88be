"""transformers, peft and accelerate running on kbit through its ``bitsandbytes`` package.

A tiny Llama is built from a config (nothing is downloaded) and driven the way users drive
bitsandbytes: ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` in
4-bit and 8-bit, ``save_pretrained`` and reload, peft QLoRA with
``prepare_model_for_kbit_training`` trained by the Trainer with ``optim="paged_adamw_8bit"``
and ``"adamw_bnb_8bit"``, resume from a Trainer checkpoint, and ``merge_and_unload``.
The versions are pinned in the ``integration`` extra of pyproject.toml.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import pytest
import torch

from tests._ecosystem import require, require_compat

pytestmark = pytest.mark.slow

transformers = require("transformers")
peft = require("peft")
require("accelerate")
bnb = require_compat()

import kbit  # noqa: E402

VOCAB, HIDDEN = 128, 64
#: LoRA rank: HIDDEN x RANK adapters have 4096 elements, the optimizers' min_8bit_size,
#: so their optimizer state is 8-bit and travels through checkpoints as such.
RANK = 64


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    transformers.logging.set_verbosity_error()
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    # The reference backend has no paged memory: paged optimizers say so once.
    warnings.filterwarnings("ignore", category=kbit.KbitPagedMemoryWarning)
    logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory) -> Path:
    """A float32 tiny Llama saved with save_pretrained, as a hub checkpoint would be."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _tokens(rows: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, 16), generator=torch.Generator().manual_seed(seed))


def _load(path: Path, **quantization) -> torch.nn.Module:
    config = transformers.BitsAndBytesConfig(**quantization) if quantization else None
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


# ---------------------------------------------------------------------------- loading
@pytest.mark.parametrize(
    "quant_type, double_quant, compute_dtype",
    [("nf4", True, torch.bfloat16), ("nf4", False, torch.float32), ("fp4", True, torch.float32),
     ("fp4", False, torch.bfloat16)],
)  # fmt: skip
def test_4bit_loading_forward_and_reload(base_model_dir, tmp_path, quant_type, double_quant, compute_dtype):
    ids = _tokens(2, seed=1)
    reference = _logits(_load(base_model_dir), ids)
    model = _load(
        base_model_dir,
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, kbit.nn.Linear4bit) and layer.weight.dtype == torch.uint8
    assert layer.weight.quant_state.quant_type == quant_type and layer.weight.quant_state.nested == double_quant
    assert layer.compute_dtype == compute_dtype and type(model.lm_head) is torch.nn.Linear  # skipped by transformers
    logits = _logits(model, ids)
    assert _relative_error(logits, reference) < (0.15 if quant_type == "nf4" else 0.25)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)  # the config holds the quantization
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, kbit.nn.Linear4bit)
    assert torch.equal(_logits(reloaded, ids), logits)


def test_8bit_loading_forward_and_reload(base_model_dir, tmp_path):
    ids = _tokens(2, seed=2)
    reference = _logits(_load(base_model_dir), ids)
    model = _load(base_model_dir, load_in_8bit=True)
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, kbit.nn.Linear8bitLt) and layer.weight.dtype == torch.int8
    assert layer.weight.SCB.shape == (HIDDEN,)
    logits = _logits(model, ids)
    assert _relative_error(logits, reference) < 0.05
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded.model.layers[1].mlp.down_proj.weight, layer.weight)
    assert torch.equal(_logits(reloaded, ids), logits)


# ------------------------------------------------------------------------------ QLoRA
class _Batches(torch.utils.data.Dataset):
    """Windows of a repeating token pattern: a language a tiny model learns in a few steps."""

    def __init__(self) -> None:
        pattern = torch.randint(0, VOCAB, (8,), generator=torch.Generator().manual_seed(3)).repeat(4)
        self.rows = [pattern[i % 8 : i % 8 + 16] for i in range(32)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[index], "labels": self.rows[index]}


def _qlora_model(base_model_dir: Path) -> torch.nn.Module:
    model = _load(
        base_model_dir,
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = peft.prepare_model_for_kbit_training(model)
    config = peft.LoraConfig(r=RANK, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                             task_type="CAUSAL_LM")  # fmt: skip
    return peft.get_peft_model(model, config)


def _trainer(model, output_dir: Path, optim: str, steps: int = 6) -> "transformers.Trainer":
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        optim=optim,
        logging_steps=1,
        save_steps=3,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=_Batches())


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _adapters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


@pytest.fixture(scope="module", params=["paged_adamw_8bit", "adamw_bnb_8bit"])
def qlora_run(request, base_model_dir, tmp_path_factory):
    """A QLoRA model trained for 6 steps (checkpoints at 3 and 6) with one 8-bit optimizer."""
    output_dir = tmp_path_factory.mktemp(request.param)
    model = _qlora_model(base_model_dir)
    trainer = _trainer(model, output_dir, request.param)
    trainer.train()
    return request.param, model, trainer, output_dir


def test_qlora_trains_with_the_trainer_and_an_8bit_optimizer(qlora_run):
    optim, model, trainer, _ = qlora_run
    losses = _losses(trainer)
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2]) - 0.1, losses
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert type(optimizer) is bnb.optim.AdamW and isinstance(optimizer, kbit.optim.AdamW)
    adapters = [p for name, p in model.named_parameters() if "lora_A" in name]
    assert adapters and all(optimizer.state[p]["state1"].dtype == torch.uint8 for p in adapters)
    # The 4-bit base stays frozen and 4-bit.
    base = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base, kbit.nn.Linear4bit) and base.weight.dtype == torch.uint8 and not base.weight.requires_grad


def test_resume_from_a_checkpoint_continues_identically(qlora_run, base_model_dir, tmp_path):
    optim, model, trainer, output_dir = qlora_run
    resumed_model = _qlora_model(base_model_dir)
    resumed = _trainer(resumed_model, tmp_path, optim)
    resumed.train(resume_from_checkpoint=str(output_dir / "checkpoint-3"))
    # The first three losses come back with the checkpoint's trainer state; the last three
    # are computed again from the restored weights, optimizer state, scheduler and RNG.
    assert len(_losses(resumed)) == 6 and _losses(resumed)[3:] == _losses(trainer)[3:]
    final, again = _adapters(model), _adapters(resumed_model)
    assert final.keys() == again.keys() and all(torch.equal(final[name], again[name]) for name in final)


def test_merge_and_unload_keeps_what_the_adapters_learned(qlora_run):
    _, trained, _, _ = qlora_run
    model = copy.deepcopy(trained)  # merging changes the model in place; the other tests use it
    ids = _tokens(2, seed=4)
    before = _logits(model, ids)
    assert torch.equal(before, _logits(trained, ids))
    merged = model.merge_and_unload()
    layer = merged.model.layers[0].self_attn.q_proj
    assert isinstance(layer, kbit.nn.Linear4bit) and layer.weight.dtype == torch.uint8  # requantized with the update
    # Merging re-quantizes the updated weights: the result differs by about 4-bit error.
    assert _relative_error(_logits(merged, ids), before) < 0.1


def test_full_finetune_keeps_embedding_state_in_32bit(base_model_dir, tmp_path):
    model = _load(base_model_dir)
    trainer = _trainer(model, tmp_path, "adamw_bnb_8bit", steps=2)
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    embedding, mlp = model.model.embed_tokens.weight, model.model.layers[0].mlp.up_proj.weight
    assert embedding.numel() >= 4096 and mlp.numel() >= 4096  # both would be 8-bit without the override
    # The Trainer registers the 32-bit override only for optimizers named bitsandbytes.*.
    assert optimizer.state[embedding]["state1"].dtype == torch.float32
    assert optimizer.state[mlp]["state1"].dtype == torch.uint8
