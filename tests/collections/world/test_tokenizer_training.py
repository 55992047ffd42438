"""The tiny tokenizers train on CPU on generated videos (falling loss, rising PSNR, logged), resume,
fine-tune from a run; `cupola world tokenize/detokenize` round-trips a real mp4 and
`tokenizer-eval` writes PSNR/SSIM with side-by-side PNG/MP4."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cupola.recipes.registry import catalog
from cupola.recipes.testing import run_recipe_briefly
from cupola.toolkit.testing import spawn


def _train(rank: int, world: int, name: str, out: str, steps: int, overrides: tuple[str, ...] = ()) -> None:
    run_recipe_briefly(rank, world, "world", name, out, steps, overrides)


def _metrics(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run / "logs" / "metrics.csv").open()))


def _series(run: Path, key: str) -> list[float]:
    return [float(r[key]) for r in _metrics(run) if r.get(key)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizer_runs")
    out = {"cv": root / "cv", "dv": root / "dv"}
    spawn(_train, 1, "cosmos_tokenizer_tiny_train", str(out["cv"]), 16)
    spawn(_train, 1, "cosmos_tokenizer_tiny_dv_train", str(out["dv"]), 2)
    return out


def test_tiny_tokenizer_learns_with_falling_loss_and_rising_psnr(runs):
    loss, psnr = _series(runs["cv"], "train/loss"), _series(runs["cv"], "train/psnr")
    assert len(loss) == len(psnr) == 16
    assert np.mean(loss[-4:]) < 0.6 * np.mean(loss[:4])
    assert np.mean(psnr[-4:]) > np.mean(psnr[:4]) + 1.0  # dB
    assert _series(runs["cv"], "val/psnr") and _series(runs["cv"], "val/l1")
    summary = json.loads((runs["cv"] / "summary.json").read_text())
    assert summary["steps"] == 16 and summary["parameters"] > 0


def test_an_interrupted_tokenizer_run_resumes_exactly(runs, tmp_path):
    from cupola.toolkit.training.logs import loss_curves

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    spawn(_train, 1, "cosmos_tokenizer_tiny_train", str(whole), 4)
    spawn(_train, 1, "cosmos_tokenizer_tiny_train", str(parts), 2)
    spawn(_train, 1, "cosmos_tokenizer_tiny_train", str(parts), 4)  # continues from step 2
    assert loss_curves(parts)["train"] == loss_curves(whole)["train"]


def test_finetune_starts_from_the_run_and_checks_its_shape(runs, tmp_path):
    out = tmp_path / "ft"
    spawn(_train, 1, "cosmos_tokenizer_tiny_finetune", str(out), 2, (f"init_from={runs['cv']}",))
    scratch_first = _series(runs["cv"], "train/loss")[0]
    assert _series(out, "train/loss")[0] < 0.7 * scratch_first  # it starts trained
    from cupola.collections.world.tokenizers.checkpoint import tokenizer_sources
    from cupola.collections.world.tokenizers.model import tokenizer_config
    from cupola.toolkit.config import ConfigError

    with pytest.raises(ConfigError, match=r"differs from model= in fsq_levels"):
        tokenizer_sources(str(runs["cv"]), tokenizer_config("tiny_dv"))


def test_adversarial_stage_trains_resumes_and_loads_as_a_plain_tokenizer(runs, tmp_path):
    from cupola.collections.world.tokenizers.checkpoint import load_tokenizer
    from cupola.toolkit.training.logs import loss_curves

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    start = (f"init_from={runs['cv']}", "loss.adversarial_start_step=1")
    spawn(_train, 1, "cosmos_tokenizer_tiny_adversarial", str(whole), 3, start)
    g, d = _series(whole, "train/adversarial_g"), _series(whole, "train/adversarial_d")
    assert len(g) == len(d) == 3 and all(np.isfinite(g + d))
    spawn(_train, 1, "cosmos_tokenizer_tiny_adversarial", str(parts), 2, start)
    spawn(
        _train, 1, "cosmos_tokenizer_tiny_adversarial", str(parts), 3, start
    )  # the discriminator resumes too
    assert loss_curves(parts)["train"] == loss_curves(whole)["train"]
    model = load_tokenizer(whole)  # the tokenizer alone, the discriminator left behind
    assert not any(k.startswith("discriminator") for k in model.state_dict())


def _synthetic_video(root: Path) -> Path:
    from cupola.collections.world.data.synthetic import write_moving_digits

    return write_moving_digits(root, num_videos=1, frames=14, size=40, seed=3)[0]


@pytest.mark.parametrize("kind", ["cv", "dv"])
def test_tokenize_cli_round_trips_an_mp4(runs, tmp_path, kind):
    from cupola.collections.world.tokenizers.checkpoint import load_tokenizer
    from cupola.toolkit.cli import main
    from cupola.toolkit.data.video import probe_video, read_frames_at

    video = _synthetic_video(tmp_path)  # 14 frames of 40 px: padded to 17 x 40 x 40 for 4x8x8
    npz, back = tmp_path / "v.npz", tmp_path / "back.mp4"
    assert (
        main(
            [
                "world",
                "tokenize",
                "--checkpoint",
                str(runs[kind]),
                str(video),
                str(npz),
                "--chunk-frames",
                "4",
            ]
        )
        == 0
    )
    data = np.load(npz)
    key = "indices" if kind == "dv" else "latent"
    assert key in data and data[key].shape[-3:] == (5, 5, 5)  # 17 frames -> 5, 40 px -> 5
    meta = json.loads(str(data["meta"]))
    assert (meta["frames"], meta["height"], meta["width"]) == (14, 40, 40)
    assert (
        main(
            [
                "world",
                "detokenize",
                "--checkpoint",
                str(runs[kind]),
                str(npz),
                str(back),
                "--chunk-latents",
                "2",
            ]
        )
        == 0
    )
    info = probe_video(back)
    assert (info.frames, info.height, info.width) == (14, 40, 40)
    # the .npz holds the one-shot encoding (chunked encoding is exact up to fp32 rounding, which may
    # flip an FSQ code that sits on a rounding boundary), and the mp4 holds its decoding
    model = load_tokenizer(runs[kind])
    frames = read_frames_at(video, range(14))
    x = torch.from_numpy(np.pad(frames, ((0, 3), (0, 0), (0, 0), (0, 0)), mode="edge")).permute(3, 0, 1, 2)[
        None
    ]
    with torch.no_grad():
        z = model.encode(x.float() / 127.5 - 1)
        if kind == "dv":
            assert (torch.from_numpy(data["indices"]).long() == z[1]).float().mean() > 0.99
            stored = model.fsq.indices_to_codes(torch.from_numpy(data["indices"]).long())
        else:
            torch.testing.assert_close(torch.from_numpy(data["latent"]), z, rtol=1e-4, atol=1e-4)
            stored = torch.from_numpy(data["latent"])
        y = model.decode(stored)
    expected = ((y[0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 3, 0)[:14].numpy()
    got = read_frames_at(back, range(14)).astype(np.float64)
    error = np.abs(got - expected).mean()  # the mp4 encoder's loss, in 8-bit levels
    assert error < 0.5 * np.abs(got - frames).mean(), (
        error,
        np.abs(got - frames).mean(),
    )  # the decode, not the input
    assert (
        main(
            [
                "world",
                "detokenize",
                "--checkpoint",
                str(runs["dv" if kind == "cv" else "cv"]),
                str(npz),
                str(back),
            ]
        )
        == 2
    )


def test_tokenizer_eval_writes_scores_and_side_by_side(runs, tmp_path):
    from cupola.toolkit.cli import main

    videos = tmp_path / "videos"
    _synthetic_video(videos)
    out = tmp_path / "eval"
    assert (
        main(
            [
                "world",
                "tokenizer-eval",
                "--checkpoint",
                str(runs["cv"]),
                "--videos",
                str(videos),
                "--frames",
                "9",
                "--size",
                "32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["videos"] == 1 and results["tokenizer"] == "CV4x8x8"
    assert 5 < results["psnr"] < 60 and 0 < results["ssim"] <= 1
    assert (out / "side_by_side.png").stat().st_size > 500 and (out / "side_by_side.mp4").stat().st_size > 500


def test_every_tokenizer_recipe_builds_and_validates_with_tiny_overrides(tmp_path):
    import fiddle as fdl

    from cupola.collections.world.tokenizers import tokenizer_config
    from cupola.recipes.llm import as_config
    from cupola.toolkit.config import validate

    recipes = catalog("world")
    flavors = ("cv4x8x8", "cv8x8x8", "cv8x16x16", "dv4x8x8", "dv8x8x8", "dv8x16x16", "ci8x8", "di16x16")
    assert {f"cosmos_tokenizer_{f}_{kind}" for f in flavors for kind in ("train", "finetune")} <= set(recipes)
    for name, factory in recipes.items():
        if not name.startswith("cosmos_tokenizer_"):
            continue
        recipe = factory()
        big = fdl.build(recipe.model)
        assert name.startswith("cosmos_tokenizer_tiny") or big.fsq_levels == (
            (8, 8, 8, 5, 5, 5) if "_dv" in name or "_di" in name else None
        )
        recipe.model = as_config(tokenizer_config("tiny_dv" if big.discrete else "tiny"))
        recipe.data.train, recipe.data.val = "synthetic:digits", None
        recipe.data.num_frames, recipe.data.size = 9, 32
        recipe.trainer.output_dir, recipe.trainer.devices = str(tmp_path / name), 1
        recipe.init_from = None
        call = fdl.build(recipe)
        for value in call.keywords.values():
            validate(value)


class _StandInI3D(torch.nn.Module):
    """Has the TorchScript I3D's call signature; features = per-channel moments over time and space."""

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = True
    ):
        flat = x.flatten(2)
        return torch.cat([flat.mean(-1), flat.std(-1), flat.abs().mean(-1), (flat**2).mean(-1)], 1)


def test_tokenizer_eval_adds_rfvd_with_a_local_i3d(runs, tmp_path):
    from cupola.collections.world.data.synthetic import write_moving_digits
    from cupola.collections.world.tokenizers.checkpoint import load_tokenizer
    from cupola.collections.world.tokenizers.evaluate import I3DFeatures, evaluate_tokenizer
    from cupola.toolkit.cli import main

    i3d = tmp_path / "i3d.pt"
    torch.jit.script(_StandInI3D()).save(str(i3d))
    assert I3DFeatures(i3d).num_features == 12
    videos = tmp_path / "videos"
    write_moving_digits(videos, num_videos=4, frames=12, size=32, seed=7)
    out = tmp_path / "eval"
    argv = ["world", "tokenizer-eval", "--checkpoint", str(runs["cv"]), "--videos", str(videos)]
    argv += ["--frames", "9", "--size", "32", "--out", str(out), "--i3d", str(i3d)]
    assert main(argv) == 0
    rfvd = json.loads((out / "results.json").read_text())["rfvd"]
    assert rfvd > 0
    # a perfect reconstruction has rFVD 0: the metric compares what it should
    model = load_tokenizer(runs["cv"])
    model.decode = lambda z, stream=None: identity.pop(0)
    from cupola.collections.world.data.clips import VideoClipDataset

    clips = VideoClipDataset(str(videos), num_frames=9, size=32, train=False)
    identity = [clips[i]["video"][None] for i in range(len(clips))]
    same = evaluate_tokenizer(model, videos, num_frames=9, size=32, i3d=i3d)
    assert abs(same["rfvd"]) < 1e-3 < rfvd
    assert same["psnr"] > 60  # (torchmetrics caps a zero error at a finite PSNR)
    assert main([*argv[:-2], "--i3d", str(tmp_path / "missing.pt")]) == 2
