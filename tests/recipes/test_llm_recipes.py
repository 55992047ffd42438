"""The LLM recipe catalog: every recipe builds and validates at tiny size; the big recipes' own
settings (activation checkpointing, gradient accumulation, HF init) train end to end at tiny size;
`cupola run --devices 2` trains with FSDP2 and its checkpoint exports to a working HF Llama."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import fiddle as fdl
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cupola.collections.llm.models.gpt import FLAVORS, GPTConfig
from cupola.collections.llm.upcycling import moe_config
from cupola.recipes.llm import as_config
from cupola.recipes.registry import catalog
from cupola.toolkit.cli import main
from cupola.toolkit.config import validate
from cupola.toolkit.testing import spawn

TINY_LLAMA = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2)


def tiny_overrides(recipe, out: Path, init_from: str | None = None):
    tiny = dataclasses.replace(FLAVORS["tiny"], max_seq_len=64)
    if (
        getattr(recipe, "upcycle", None) is not None
    ):  # the recipe's own upcycling (E, G, T, routing) on the tiny dense model
        recipe.model = as_config(moe_config(tiny, fdl.build(recipe.upcycle)))
    else:
        recipe.model = as_config(tiny)
    recipe.data.seq_len = 32
    recipe.data.micro_batch_size = 2
    recipe.data.tokenizer = "byte"
    recipe.trainer.devices = 1
    recipe.trainer.max_steps = 3
    recipe.trainer.precision = "32"
    recipe.trainer.output_dir = str(out)
    recipe.trainer.log_every_n_steps = 1
    recipe.trainer.val_check_interval = None
    recipe.trainer.global_batch_size = 8  # micro-batch 2 on one rank: 4 micro-batches per step
    recipe.optim.warmup_steps = 1
    recipe.parallel.compile = False
    recipe.parallel.ep = 1
    if init_from is not None:
        recipe.init_from = init_from
    return recipe


@pytest.fixture(scope="module")
def tiny_hf_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random HF Llama with cupola's tiny GPT shape (the finetune recipe's starting point)."""
    tiny: GPTConfig = FLAVORS["tiny"]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tiny.vocab_size,
        hidden_size=tiny.dim,
        intermediate_size=tiny.ffn_hidden_size,
        num_hidden_layers=tiny.n_layers,
        num_attention_heads=tiny.n_heads,
        num_key_value_heads=tiny.n_kv_heads,
        max_position_embeddings=64,
        rms_norm_eps=tiny.norm_eps,
        rope_theta=tiny.rope_theta,
        tie_word_embeddings=False,
    )
    out = tmp_path_factory.mktemp("tiny_hf_llama")
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def test_every_recipe_builds_and_validates_with_tiny_overrides(tmp_path: Path, tiny_hf_llama: Path) -> None:
    recipes = catalog("llm")
    assert {
        "gpt_tiny_pretrain",
        "llama3_8b_pretrain",
        "llama3_8b_finetune",
        "llama3_8b_moe8x_online_upcycle",
        "nemotron4_15b_moe_e8g8t8_online_upcycle",
    } <= set(recipes)
    for name, factory in recipes.items():
        recipe = tiny_overrides(
            factory(), tmp_path / name, str(tiny_hf_llama) if "finetune" in name else None
        )
        call = fdl.build(recipe)
        for value in call.keywords.values():
            validate(value)
        assert call.keywords["trainer"].output_dir == str(tmp_path / name)


def test_big_recipes_keep_their_published_settings() -> None:
    recipe = catalog()["llama3_8b_pretrain"]()
    assert recipe.model.dim == 4096 and recipe.model.n_layers == 32 and recipe.model.n_kv_heads == 8
    assert recipe.trainer.global_batch_size == 512 and recipe.data.seq_len == 8192
    assert recipe.trainer.precision == "bf16-mixed" and recipe.parallel.activation_checkpointing
    finetune = catalog()["llama3_8b_finetune"]()
    assert (
        finetune.init_from == "meta-llama/Meta-Llama-3-8B" and finetune.data.tokenizer == finetune.init_from
    )


def _run_recipe(rank: int, world: int, name: str, out: str, init_from: str | None, lr: float = 0.0) -> None:
    recipe = tiny_overrides(catalog()[name](), Path(out), init_from)
    if lr:
        recipe.optim.lr = recipe.optim.min_lr = lr
    fdl.build(recipe)()


def test_llama3_8b_pretrain_settings_train_at_tiny_size(tmp_path: Path) -> None:
    """Activation checkpointing and 4-way gradient accumulation, as the 8B recipe has them."""
    spawn(_run_recipe, 1, "llama3_8b_pretrain", str(tmp_path), None)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["tokens_per_step"] == 8 * 32
    assert summary["final_loss"] < summary["first_loss"]


def test_finetune_starts_from_the_hf_weights(tmp_path: Path, tiny_hf_llama: Path) -> None:
    # with a vanishing learning rate the trained weights stay the HF weights (a random init would not)
    spawn(_run_recipe, 1, "llama3_8b_finetune", str(tmp_path), str(tiny_hf_llama), 1e-12)
    from cupola.collections.llm.api import load_model
    from cupola.collections.llm.models.gpt import load_hf_llama

    _, hf_weights = load_hf_llama(str(tiny_hf_llama))
    trained = load_model(tmp_path).state_dict()
    assert hf_weights.keys() == trained.keys()
    for key, value in hf_weights.items():
        torch.testing.assert_close(trained[key], value, rtol=0, atol=1e-6, msg=key)
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 3


def test_finetune_with_a_mismatched_checkpoint_names_the_fields(tmp_path: Path) -> None:
    config = LlamaConfig(
        **TINY_LLAMA, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "other")
    with pytest.raises(Exception, match="vocab_size"):
        spawn(_run_recipe, 1, "llama3_8b_finetune", str(tmp_path / "run"), str(tmp_path / "other"))


def test_cupola_run_two_processes_fsdp_then_export_to_hf(tmp_path: Path, nemorun_home: Path, capsys) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "run",
            "gpt_tiny_pretrain",
            "--devices",
            "2",
            "trainer.max_steps=20",
            "trainer.log_every_n_steps=5",
            "trainer.val_check_interval=10",
            f"trainer.output_dir={out}",
            "data.seq_len=64",
            "data.micro_batch_size=8",
        ]
    )
    assert code == 0, capsys.readouterr().err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 20
    assert summary["tokens_per_step"] == 2 * 8 * 64  # two data-parallel ranks
    assert summary["final_loss"] < summary["first_loss"] - 0.5

    # a checkpoint sharded by 2 processes, read by 1, exported, loaded by transformers
    assert main(["export", str(out), "--out", str(tmp_path / "hf")]) == 0
    from cupola.collections.llm.api import load_model

    ours = load_model(out)
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=1e-5, atol=1e-5)


def test_cupola_run_tensor_parallel(tmp_path: Path, nemorun_home: Path, capsys) -> None:
    """TP=2 over 2 processes: one data-parallel rank, so each step sees one micro-batch."""
    out = tmp_path / "run"
    overrides = ["trainer.max_steps=12", "trainer.log_every_n_steps=4", "trainer.val_check_interval=null"]
    overrides += [f"trainer.output_dir={out}", "data.seq_len=64", "data.micro_batch_size=8", "parallel.tp=2"]
    code = main(["run", "gpt_tiny_pretrain", "--devices", "2", *overrides])
    assert code == 0, capsys.readouterr().err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tokens_per_step"] == 8 * 64
    assert summary["final_loss"] < summary["first_loss"] - 0.5


def test_upcycle_recipes_keep_the_papers_settings() -> None:
    llama = catalog()["llama3_8b_moe8x_online_upcycle"]()
    assert (llama.model.moe.num_experts, llama.model.moe.top_k) == (8, 2)
    assert llama.model.moe.router_order == "topk_then_softmax" and llama.model.moe.capacity_factor == 4.0
    assert llama.model.moe.aux_loss_coeff == 1e-2
    assert (llama.optim.lr, llama.optim.min_lr, llama.optim.warmup_steps) == (3e-5, 3e-7, 100)
    nemo = catalog()["nemotron4_15b_moe_e8g8t8_online_upcycle"]()
    assert (nemo.upcycle.num_experts, nemo.upcycle.granularity, nemo.upcycle.top_k) == (8, 8, 8)
    assert nemo.model.moe.num_experts == 64 and nemo.model.moe.router_order == "softmax_then_topk"
    assert nemo.model.moe.expert_hidden_size == 24576 // 8 and nemo.model.moe.mlp == "squared_relu"


def _run(name: str, out: Path, *overrides: str) -> dict:
    common = ["trainer.log_every_n_steps=2", "trainer.val_check_interval=null", "data.seq_len=64"]
    code = main(["run", name, "--devices", "2", f"trainer.output_dir={out}", *common, *overrides])
    assert code == 0
    return json.loads((out / "summary.json").read_text())


def test_online_upcycling_with_expert_parallelism(tmp_path: Path, nemorun_home: Path) -> None:
    """Dense run → (a) dense continued, (b) online-upcycled E8T2 over EP=2: with renormalised routing the
    upcycled model starts exactly where the dense one is (same first loss); resuming never re-upcycles."""
    dense = tmp_path / "dense"
    _run("gpt_tiny_pretrain", dense, "trainer.max_steps=6")
    steps = ["trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2", f"init_from={dense}"]
    cont = _run("gpt_tiny_finetune", tmp_path / "cont", *steps)
    moe = _run("gpt_tiny_moe8x_online_upcycle", tmp_path / "moe", *steps, "parallel.ep=2")
    assert moe["first_loss"] == pytest.approx(cont["first_loss"], abs=1e-5)
    assert moe["final_loss"] < moe["first_loss"]

    dense.rename(tmp_path / "dense_moved")  # resuming must not need the dense checkpoint any more
    resumed = _run(
        "gpt_tiny_moe8x_online_upcycle",
        tmp_path / "moe",
        *steps[:2],
        "trainer.max_steps=6",
        f"init_from={dense}",
        "parallel.ep=2",
    )
    assert resumed["resumed_from"].endswith("step_00000004") and resumed["steps_this_run"] == 2

    # the MoE run exports to HF Mixtral, and transformers computes the same logits
    from transformers import AutoModelForCausalLM

    from cupola.collections.llm.api import load_model

    assert main(["export", str(tmp_path / "moe"), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "mixtral"
    ours = load_model(tmp_path / "moe")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)
