"""The tutorial notebooks run top to bottom in a fresh kernel, with tiny settings, as users run them."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

import nbformat
import pytest
import yaml
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

from cupola.toolkit.training.checkpoint import checkpoint_step, latest_checkpoint

TUTORIALS = Path(__file__).resolve().parents[2] / "tutorials"
KERNEL = "python3"  # the kernel the notebooks name in their metadata
RunTutorial = Callable[[str, int], tuple[nbformat.NotebookNode, Path]]  # (notebook name, steps)


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The notebooks' kernel, pinned to this interpreter whatever kernelspecs the machine has."""
    jupyter_dir = tmp_path / "jupyter"
    write_kernel_spec(jupyter_dir / "kernels" / KERNEL)  # argv: this sys.executable -m ipykernel_launcher
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_dir))  # searched before the user's and the system's
    assert KernelSpecManager().get_kernel_spec(KERNEL).argv[0] == sys.executable
    return KERNEL


def execute(path: Path, cwd: Path, kernel: str) -> nbformat.NotebookNode:
    """Run every cell (the kernel inherits this process's environment); a failing cell raises."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name=kernel, resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


@pytest.fixture
def run_tutorial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: str) -> RunTutorial:
    """Runs a tutorial by name with ``steps`` training steps; returns the executed notebook and its outputs.

    The notebook runs in ``tmp_path``, writes under ``tmp_path/run`` (``CUPOLA_TUTORIAL_OUT``) and
    keeps its NeMo-Run experiments in ``tmp_path/nemorun`` (``NEMORUN_HOME``), not the user's home.
    """

    def run(name: str, steps: int) -> tuple[nbformat.NotebookNode, Path]:
        out = tmp_path / "run"
        monkeypatch.setenv("CUPOLA_TUTORIAL_STEPS", str(steps))
        monkeypatch.setenv("CUPOLA_TUTORIAL_OUT", str(out))
        monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemorun"))
        return execute(TUTORIALS / name, tmp_path, kernel), out

    return run


def stdout_of(nb: nbformat.NotebookNode, tag: str) -> str:
    (cell,) = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


@pytest.mark.parametrize("path", sorted(TUTORIALS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_stored_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    ran = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not ran, f"{path.name}: cells {ran} hold outputs; clear them before committing"


@pytest.mark.slow
def test_pretrain_tiny_gpt(tmp_path: Path, run_tutorial: RunTutorial):
    nb, out = run_tutorial("01_pretrain_tiny_gpt.ipynb", 20)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 20
    assert summary["final_loss"] < summary["first_loss"] - 1.0
    assert (out / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "nemorun" / "experiments" / "tutorial_tiny_gpt").is_dir()

    # the generate cell prints "greedy:  <prompt><text>" then "sampled: <prompt><text>"
    prompt = "The for statement"
    greedy, sep, sampled = stdout_of(nb, "generate").partition("\nsampled: ")
    assert sep and greedy.startswith(f"greedy:  {prompt}") and sampled.startswith(prompt), (greedy, sampled)
    assert greedy.removeprefix(f"greedy:  {prompt}"), "greedy decoding generated nothing"
    assert sampled.removeprefix(prompt).strip(), "sampling generated only whitespace"


@pytest.mark.slow
def test_upcycle_tiny_gpt(run_tutorial: RunTutorial):
    # three launches (dense pretraining, then the upcycled and the dense continuation, 8 steps each)
    nb, out = run_tutorial("02_upcycle_tiny_gpt.ipynb", 16)

    # the coarse invariant: the upcycled model's logits are the dense model's (the cell asserts it too)
    found = re.search(r"max abs diff of the logits: (\S+)", stdout_of(nb, "invariant"))
    assert found and float(found[1]) < 1e-4, stdout_of(nb, "invariant")
    # fine-grained, softmax-then-topK: the output is (E*G/T)*P(x) times the dense one, as predicted
    found = re.search(r"max deviation from the measured ratio (\S+)", stdout_of(nb, "fine_grained"))
    assert found and float(found[1]) < 1e-4, stdout_of(nb, "fine_grained")

    summaries = {
        name: json.loads((out / name / "summary.json").read_text())
        for name in ("dense", "dense_continued", "moe_upcycled")
    }
    assert summaries["dense"]["steps"] == 16
    for name in ("dense_continued", "moe_upcycled"):
        assert summaries[name]["steps"] == 8, name
        assert summaries[name]["final_val_loss"] is not None, name
    # online upcycling starts from the dense function: same first batch, same loss (no token dropped)
    first = summaries["moe_upcycled"]["first_loss"], summaries["dense_continued"]["first_loss"]
    assert first[0] == pytest.approx(first[1], abs=1e-3), first
    assert "moe/load_imbalance" in stdout_of(nb, "router")
    assert "dense_continued" in stdout_of(nb, "compare") and "moe_upcycled" in stdout_of(nb, "compare")


@pytest.mark.slow
def test_tiny_vlm(run_tutorial: RunTutorial):
    # two launches (align, then SFT from it), 4 steps each: checkpoints at steps 2 and 4
    nb, out = run_tutorial("03_tiny_vlm.ipynb", 4)

    for stage in ("align", "sft"):
        summary = json.loads((out / stage / "summary.json").read_text())
        assert summary["steps"] == 4, stage
        assert math.isfinite(summary["first_loss"]) and math.isfinite(summary["final_loss"]), summary
        assert summary["final_val_loss"] is not None and math.isfinite(summary["final_val_loss"]), stage
        assert checkpoint_step(latest_checkpoint(out / stage / "checkpoints")) == 4, stage
        assert (out / stage / "loss_curve.png").read_bytes().startswith(b"\x89PNG"), stage

    # align moved the projector only; SFT moved every component (the cell asserts it too)
    frozen = stdout_of(nb, "frozen")
    align, _, sft = frozen.partition("-> sft")
    assert re.search(r"vision\s+0 of", align) and re.search(r"llm\s+0 of", align), frozen
    assert not re.search(r"projector\s+0 of", align), frozen
    assert not re.search(r"(vision|projector|llm)\s+0 of", sft), frozen

    # one line per validation clip with a colour question: "<id>  true: <colour>  model: <repr of the answer>"
    printed = re.findall(r"^(vid\d+)  true: (\w+)\s+model: (.+)$", stdout_of(nb, "chat"), re.M)
    truth = {}
    for line in (out / "data" / "val.jsonl").read_text().splitlines():
        record = json.loads(line)
        turns = [t["value"].removeprefix("<video>\n") for t in record["conversations"]]
        if record["media"][0]["type"] == "video" and "What colour is the shape?" in turns[0::2]:
            truth[record["id"]] = turns[turns.index("What colour is the shape?") + 1]
    assert truth and {clip: colour for clip, colour, _ in printed} == truth, printed

    results = json.loads((out / "niah" / "niah.json").read_text())
    assert len(results["cells"]) == 6
    assert (out / "niah" / "niah_heatmap.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_tiny_tokenizer(run_tutorial: RunTutorial):
    nb, out = run_tutorial("04_tiny_tokenizer.ipynb", 12)

    found = re.search(
        r"max difference from the whole video's first 3 latent frames: (\S+)", stdout_of(nb, "causal")
    )
    assert found and float(found[1]) < 1e-5, stdout_of(nb, "causal")
    summary = json.loads((out / "tokenizer" / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["final_loss"] < summary["first_loss"]
    found = re.search(r"train PSNR (\S+) -> (\S+) dB", stdout_of(nb, "curves"))
    assert found and float(found[2]) > float(found[1]), stdout_of(nb, "curves")
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["videos"] == 4 and math.isfinite(results["psnr"])
    assert (out / "eval" / "side_by_side.png").read_bytes().startswith(b"\x89PNG")
    found = re.search(r"chunked vs one shot: max difference (\S+)", stdout_of(nb, "chunked"))
    assert found and float(found[1]) < 1e-4, stdout_of(nb, "chunked")
    assert "frames=33" in stdout_of(nb, "cli")


@pytest.mark.slow
def test_video_curation(run_tutorial: RunTutorial):
    nb, out = run_tutorial("06_video_curation.ipynb", 8)

    # 6 generated videos + an MJPEG .avi + 4 broken files; every degradation caught
    summary = json.loads((out / "curated" / "summary.json").read_text())
    assert (summary["videos"], summary["videos_ok"], summary["videos_failed"]) == (11, 7, 4), summary
    reasons = {"blurry", "duplicate", "low_motion", "overexposed", "too_short", "underexposed"}
    assert set(summary["clips_dropped"]) == reasons, summary
    kept = summary["clips_kept"]
    manifest = stdout_of(nb, "manifest")
    found = re.search(r"^kept\s+-\s+(\d+)$", manifest, re.M)
    assert found and int(found[1]) == kept, manifest
    assert re.search(r"^\s+too_short\s+1$", manifest, re.M) and "duplicate_of:shots_v0000-" in manifest
    assert (out / "clips.png").read_bytes().startswith(b"\x89PNG")
    assert stdout_of(nb, "dataset").startswith(f"{kept} clips in the shards"), stdout_of(nb, "dataset")

    # the tokenizer trained on the shards and reconstructs every curated clip
    tokenizer = json.loads((out / "tokenizer" / "summary.json").read_text())
    assert tokenizer["steps"] == 8 and tokenizer["final_loss"] < tokenizer["first_loss"], tokenizer
    found = re.search(r"train PSNR (\S+) -> (\S+) dB", stdout_of(nb, "curves"))
    assert found and float(found[2]) > float(found[1]), stdout_of(nb, "curves")
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["videos"] == kept and math.isfinite(results["psnr"]), results
    assert f"{kept} curated clips: reconstruction PSNR" in stdout_of(nb, "eval")


def decoded_frames(path: Path) -> list:
    """Every frame of a video file as PyAV decodes it (``uint8 [H, W, 3]`` each)."""
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.mark.slow
def test_tiny_world_model(run_tutorial: RunTutorial):
    # three launches (tokenizer, Text2World, action post-training from it), 4 steps each
    nb, out = run_tutorial("05_tiny_world_model.ipynb", 4)

    out = out.resolve()  # as the notebook writes its runs' paths
    printed = stdout_of(nb, "summaries") + stdout_of(nb, "actions")
    for name in ("tokenizer", "text2world", "actions"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["steps"] == 4, name
        assert math.isfinite(summary["first_loss"]) and math.isfinite(summary["final_loss"]), summary
        assert checkpoint_step(latest_checkpoint(out / name / "checkpoints")) == 4, name
        assert re.search(rf"^{name}: 4 steps, loss ", printed, re.M), printed
    tokenizer = json.loads((out / "tokenizer" / "summary.json").read_text())
    assert tokenizer["final_loss"] < tokenizer["first_loss"], tokenizer
    # the action model was post-trained from the Text2World run, both over the tutorial's tokenizer
    for name, init_from in (("text2world", None), ("actions", str(out / "text2world"))):
        config = yaml.safe_load((out / name / "config.yaml").read_text())
        assert config["tokenizer"] == str(out / "tokenizer") and config["init_from"] == init_from, name

    # Text2World from a prompt: an MP4 of the requested 9 frames of 32x32, a GIF beside it
    assert re.search(r"9 frames of 32x32 -> ", stdout_of(nb, "generate")), stdout_of(nb, "generate")
    frames = decoded_frames(out / "generated" / "red_disc.mp4")
    assert len(frames) == 9 and all(f.shape == (32, 32, 3) for f in frames), [f.shape for f in frames]
    assert (out / "generated" / "red_disc.gif").read_bytes().startswith(b"GIF8")
    refused = stdout_of(nb, "refused")
    assert refused.startswith("refused: ") and "'kill' (as 'kills')" in refused, refused

    # rollouts: frame 0 is the tokenizer's reconstruction of the given frame; the actions reach the
    # model (its action MLP trained away from zero) and change the rollout
    rollout = stdout_of(nb, "rollout")
    first = re.findall(
        r"first frame vs the tokenizer's reconstruction of the given frame: max difference (\d+)", rollout
    )
    assert len(first) == 2 and all(int(d) <= 1 for d in first), rollout
    found = re.search(r"action MLP output layer: max \|weight\| (\S+)", rollout)
    assert found and float(found[1]) > 0, rollout
    found = re.search(r"true vs other actions: (\d+) of (\d+) pixels differ", rollout)
    assert found and int(found[1]) > 0 and int(found[2]) == 9 * 32 * 32, rollout
    assert (out / "rollouts" / "episode0.png").read_bytes().startswith(b"\x89PNG")
    scores = dict(re.findall(r"^  (\S.*?)\s+(-?\d+\.\d+)$", stdout_of(nb, "psnr"), re.M))
    assert set(scores) == {
        "model, true actions",
        "model, other actions",
        "copy last frame",
        "tokenizer (ceiling)",
    }
    assert all(math.isfinite(float(v)) for v in scores.values()), scores
