"""The LongVILA stages chain end to end on CPU with the tiny VLM: each stage starts from the previous
stage's checkpoint, frozen components come out bit-identical and trained ones change; the trained
model answers through `cupola vlm chat` and runs the needle-in-a-haystack sweep with its heatmap."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from cupola.collections.vlm.models.vila import VLM_COMPONENTS
from cupola.recipes.registry import catalog
from cupola.toolkit.testing import spawn
from cupola.toolkit.training.checkpoint import latest_checkpoint, load_model_weights

STAGES = ("align", "pretrain", "sft", "context_extension", "long_sft")


def _shrink(recipe, out: Path, init_from: str | None, data_root: Path, steps: int = 3) -> object:
    recipe.trainer.output_dir = str(out)
    recipe.trainer.max_steps = steps
    recipe.trainer.log_every_n_steps = 1
    recipe.trainer.val_check_interval = None
    recipe.trainer.checkpoint_every_n_steps = min(steps, 2) if steps != 3 else 3
    recipe.optim.warmup_steps = 1
    recipe.optim.lr = recipe.optim.min_lr = 1e-3
    recipe.init_from = init_from
    if "train_file" in recipe.data.__arguments__:
        recipe.data.train_file = str(data_root / "train.jsonl")
        recipe.data.val_file = None
        recipe.data.micro_batch_size = 2
        recipe.data.seq_len = 256  # 8 clips must fill at least two rows
    else:  # the text stage
        recipe.data.seq_len = 256
        recipe.data.micro_batch_size = 2
        recipe.data.val_fraction = 0.0
    return recipe


def _run_stage(
    rank: int,
    world: int,
    stage: str,
    out: str,
    init_from: str | None,
    data_root: str,
    steps: int = 3,
    overrides: tuple[str, ...] = (),
) -> None:
    import fiddle as fdl

    from cupola.toolkit.cli import apply_overrides

    name = f"vila_tiny_{stage.removesuffix('_after_lora')}"
    recipe = _shrink(catalog("vlm")[name](), Path(out), init_from, Path(data_root), steps)
    fdl.build(apply_overrides(recipe, [*overrides, f"trainer.devices={world}"]))()


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return {
        k.removeprefix("model."): v
        for k, v in load_model_weights(latest_checkpoint(run / "checkpoints")).items()
    }


def _changed(before: dict, after: dict, component: str) -> bool:
    keys = [k for k in after if k.startswith(f"{component}.")]
    assert keys, component
    return any(not torch.equal(before[k], after[k]) for k in keys)


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from cupola.collections.vlm.data.synthetic import write_synthetic_video_dataset

    root = tmp_path_factory.mktemp("vlm_stages")
    data = write_synthetic_video_dataset(root / "data", num_videos=8, frames=16, size=32, seed=0)
    runs, previous = {}, None
    for stage in STAGES:
        runs[stage] = root / stage
        spawn(_run_stage, 1, stage, str(runs[stage]), previous, str(Path(data["root"])))
        previous = str(runs[stage])
    # the LongLoRA branch: stage 4 with adapters, then stage 5 from it
    for stage, init_from in (
        ("context_extension_lora", "sft"),
        ("long_sft_after_lora", "context_extension_lora"),
    ):
        runs[stage] = root / stage
        spawn(_run_stage, 1, stage, str(runs[stage]), str(runs[init_from]), str(Path(data["root"])))
    return runs


def test_each_stage_trains_exactly_its_components(stage_runs):
    """Stage k+1 starts from stage k: frozen components are bit-identical to stage k's, trained ones differ."""
    trainable = {
        "pretrain": {"projector", "llm"},
        "sft": {"vision", "projector", "llm"},
        "context_extension": {"llm"},
        "long_sft": {"projector", "llm"},
    }
    for previous, stage in itertools.pairwise(STAGES):
        before, after = _weights(stage_runs[previous]), _weights(stage_runs[stage])
        assert before.keys() == after.keys()
        for component in VLM_COMPONENTS:
            assert _changed(before, after, component) == (component in trainable[stage]), (stage, component)
        summary = json.loads((stage_runs[stage] / "summary.json").read_text())
        assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])


def test_lora_context_extension_trains_adapters_embeddings_and_norms_only(stage_runs):
    """The LongLoRA stage's checkpoint holds the adapters; every other LLM weight (and the vision
    tower and projector) is bit-identical to the SFT stage's, embeddings and norms have trained."""
    sft, lora = _weights(stage_runs["sft"]), _weights(stage_runs["context_extension_lora"])
    adapters = sorted(k for k in lora if "lora_" in k)
    n_layers = 2 * 4  # tiny LLM layers x (wq, wk, wv, wo)
    assert len(adapters) == 3 * n_layers and set(lora) - set(adapters) == set(sft)
    assert all(lora[k].abs().sum() > 0 for k in adapters if k.endswith(".lora_b"))  # B left zero: trained
    for name, before in sft.items():
        trains = name.startswith("llm.") and (
            name.startswith("llm.tok_embeddings.") or "norm." in name or name == "llm.norm.weight"
        )
        assert torch.equal(before, lora[name]) != trains, name
    summary = json.loads((stage_runs["context_extension_lora"] / "summary.json").read_text())
    learned = [
        k
        for k in lora
        if k.endswith((".lora_a", ".lora_b")) or (k in sft and not torch.equal(sft[k], lora[k]))
    ]
    assert summary["trainable_parameters"] == sum(lora[k].numel() for k in learned)
    assert summary["parameters"] == sum(v.numel() for k, v in lora.items() if not k.endswith(".lora_scale"))


def test_the_stage_after_lora_starts_from_the_merged_weights(stage_runs):
    """What loads a LoRA run (the next stage, chat, NIAH) gets a plain model computing exactly what the
    adapted model computed; the next stage trains from it."""
    from cupola.collections.vlm.generate import load_vlm
    from cupola.collections.vlm.models import VILA
    from cupola.toolkit.modules.lora import LoRAConfig, apply_lora

    run = stage_runs["context_extension_lora"]
    merged, run_config = load_vlm(run)
    assert run_config["lora"]["rank"] == 8 and run_config["trainable"] == ["llm"]
    adapted = VILA(merged.cfg)
    apply_lora(adapted.llm, LoRAConfig(**run_config["lora"]))
    adapted.load_state_dict(_weights(run), strict=True)
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), adapted.eval()(tokens), rtol=1e-5, atol=1e-5)
    after = json.loads((stage_runs["long_sft_after_lora"] / "summary.json").read_text())
    assert after["steps"] == 3 and math.isfinite(after["final_loss"])
    assert not any("lora_" in k for k in _weights(stage_runs["long_sft_after_lora"]))


def test_an_interrupted_lora_stage_resumes_exactly(stage_runs, tmp_path):
    """Adapters, their scale and the optimizer state of the trainable subset come back on resume: 2 + 2
    steps give the losses and weights of 4 uninterrupted steps."""
    from cupola.toolkit.training.logs import loss_curves

    data = str(stage_runs["sft"].parent / "data")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    spawn(_run_stage, 1, "context_extension_lora", str(whole), str(stage_runs["sft"]), data, 4)
    spawn(_run_stage, 1, "context_extension_lora", str(parts), str(stage_runs["sft"]), data, 2)
    spawn(_run_stage, 1, "context_extension_lora", str(parts), str(stage_runs["sft"]), data, 4)
    summary = json.loads((parts / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_00000002") and summary["steps_this_run"] == 2
    assert (
        loss_curves(parts)["train"] == loss_curves(whole)["train"] and len(loss_curves(whole)["train"]) == 4
    )
    a, b = _weights(whole), _weights(parts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sp_ulysses", [2, 1])
def test_long_sft_with_mm_sp_on_2_processes_follows_the_1_process_curve(stage_runs, tmp_path, sp_ulysses):
    """The long-video stage with parallel.sp=2 (Ulysses, then zigzag ring): the same rows, each
    process holding half of every sequence and encoding half of the frames, give the 1-process run's
    losses step by step."""
    from cupola.toolkit.training.logs import loss_curves

    out = tmp_path / "sp2"
    overrides = ("parallel.sp=2", f"parallel.sp_ulysses={sp_ulysses}")
    data = str(stage_runs["sft"].parent / "data")
    spawn(_run_stage, 2, "long_sft", str(out), str(stage_runs["context_extension"]), data, 3, overrides)
    one, two = loss_curves(stage_runs["long_sft"])["train"], loss_curves(out)["train"]
    assert [s for s, _ in one] == [s for s, _ in two] == [1, 2, 3]
    for (_, a), (_, b) in zip(one, two, strict=True):
        assert b == pytest.approx(a, rel=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["world_size"] == 2
        and summary["tokens_per_step"]
        == json.loads((stage_runs["long_sft"] / "summary.json").read_text())["tokens_per_step"]
    )


def test_context_extension_raised_the_rope_base(stage_runs):
    from omegaconf import OmegaConf

    sft = OmegaConf.load(stage_runs["sft"] / "config.yaml")
    extended = OmegaConf.load(stage_runs["context_extension"] / "config.yaml")
    assert extended.model.llm.rope_theta == 15.3e6 > sft.model.llm.rope_theta
    assert extended.model.llm.max_seq_len == 4096


def test_chat_and_needle_in_a_haystack_on_the_trained_model(stage_runs, capsys):
    from cupola.toolkit.cli import main

    run = stage_runs["long_sft"]
    video = next((run.parent / "data").rglob("*.mp4"))
    assert (
        main(
            [
                "vlm",
                "chat",
                "--checkpoint",
                str(run),
                "--video",
                str(video),
                "--prompt",
                "What colour is the shape?",
                "--max-new-tokens",
                "8",
            ]
        )
        == 0
    )
    answer = capsys.readouterr().out.strip().splitlines()[-1]
    assert isinstance(answer, str)
    out = run / "niah_test"
    assert (
        main(
            [
                "eval",
                "niah",
                "--model",
                str(run),
                "--frames",
                "2",
                "4",
                "--depths",
                "0",
                "0.5",
                "1",
                "--out-dir",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads((out / "niah.json").read_text())
    assert len(results["cells"]) == 6 and {
        c["needle_index"] for c in results["cells"] if c["frames"] == 4
    } == {0, 2, 4}
    assert (out / "niah_heatmap.png").stat().st_size > 1000


def _niah_cli(rank: int, world: int, argv: list[str]) -> None:
    from cupola.toolkit.cli import main

    assert main(argv) == 0


def test_niah_sequence_parallel_from_the_cli(stage_runs, tmp_path, capsys):
    """`cupola eval niah --sp 2` on two processes: each encodes half of the haystack once and runs
    half of every sequence; rank 0 writes the same sweep as one process (fp32 here; float64
    equality is tests/collections/vlm/test_vlm_niah_sp.py)."""
    from cupola.toolkit.cli import main

    run = stage_runs["long_sft"]
    common = ["eval", "niah", "--model", str(run), "--frames", "2", "4", "--depths", "0", "0.5", "1"]
    assert main([*common, "--out-dir", str(tmp_path / "one")]) == 0
    spawn(_niah_cli, 2, [*common, "--sp", "2", "--sp-ulysses", "1", "--out-dir", str(tmp_path / "two")])
    one = json.loads((tmp_path / "one" / "niah.json").read_text())["cells"]
    two = json.loads((tmp_path / "two" / "niah.json").read_text())["cells"]
    assert [(c["frames"], c["needle_index"]) for c in two] == [(c["frames"], c["needle_index"]) for c in one]
    same = sum(a["predicted"] == b["predicted"] for a, b in zip(one, two, strict=True))
    assert same >= len(one) - 1  # fp32 reduction order may flip a near-tied argmax, not the sweep
    assert (tmp_path / "two" / "niah_heatmap.png").stat().st_size > 1000
    assert main([*common, "--sp", "2"]) != 0  # one process asked to be two: how to launch it
    assert "torchrun --nproc-per-node 2 -m cupola eval niah" in capsys.readouterr().err


def _chat_cli(rank: int, world: int, argv: list[str], out: str) -> None:
    import contextlib
    import io

    from cupola.toolkit.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    Path(f"{out}.{rank}").write_text(printed.getvalue())


def test_chat_sequence_parallel_from_the_cli(stage_runs, tmp_path, capsys):
    """`cupola vlm chat --sp 2` (zigzag ring) on two processes: each decodes half of the video's
    frames, the prompt is prefilled across both and the KV cache stays split; rank 0 prints the
    one-process answer, the other rank prints nothing."""
    from cupola.toolkit.cli import main

    run = stage_runs["long_sft"]
    video = str(next((run.parent / "data").rglob("*.mp4")))
    common = [
        "vlm",
        "chat",
        "--checkpoint",
        str(run),
        "--video",
        video,
        "--prompt",
        "What colour is the shape?",
    ]
    common += ["--max-new-tokens", "8"]
    assert main(common) == 0
    one = capsys.readouterr().out
    spawn(_chat_cli, 2, [*common, "--sp", "2", "--sp-ulysses", "1"], str(tmp_path / "answer"))
    assert (tmp_path / "answer.0").read_text() == one and one.strip()
    assert (tmp_path / "answer.1").read_text() == ""
    assert main([*common, "--sp", "2"]) != 0  # one process asked to be two: how to launch it
    assert "torchrun --nproc-per-node 2 -m cupola vlm chat" in capsys.readouterr().err


def test_vision_layers_the_forward_never_reaches_are_frozen():
    """select_layer=-2 leaves the last vision layer and the post-layernorm unused: they are frozen even
    when the stage trains the vision tower, so no optimizer state is expected for them on resume."""
    from cupola.collections.vlm.lightning import freeze_unused_vision
    from cupola.collections.vlm.models import VILA, vila_config

    model = VILA(vila_config("tiny"))
    freeze_unused_vision(model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {
        n for n, _ in model.named_parameters() if n.startswith(("vision.layers.1.", "vision.post_layernorm."))
    }
    media = torch.randn(2, 3, 32, 32)
    tokens = torch.tensor([[256] + [259] * 8 + [65, 66]])
    model(tokens, media).sum().backward()
    assert all(
        p.grad is not None for n, p in model.named_parameters() if n not in frozen and n.startswith("vision.")
    )
