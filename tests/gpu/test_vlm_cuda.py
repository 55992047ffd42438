"""The tiny VLM on CUDA: bf16 on one process (single-process mixed precision, MixedPrecisionAdamW
with bf16 working copies, compiled LLM blocks) through Lightning, resumed from its checkpoint, then
chat on the GPU. Skipped without a GPU. Each run is its own process, as a real job is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

JOB = """
import sys
from cupola.collections.vlm import api
from cupola.collections.vlm.data import VLMDataModule, write_synthetic_video_dataset
from cupola.collections.vlm.models import vila_config
from cupola.toolkit.training.configs import OptimConfig, ParallelConfig, TrainerConfig

out, steps = sys.argv[1], int(sys.argv[2])
data = write_synthetic_video_dataset(out + "_data", num_videos=16, frames=16, size=32, seed=0)
cfg = vila_config("tiny")
api.train(
    model=cfg,
    data=VLMDataModule(train_file=data["train"], tokens_per_frame=cfg.tokens_per_frame,
                       image_size=cfg.vision.image_size, media_token_id=cfg.media_token_id,
                       seq_len=256, micro_batch_size=4, num_frames=8),
    trainer=TrainerConfig(max_steps=steps, accelerator="gpu", precision="bf16-mixed", output_dir=out,
                          log_every_n_steps=5, checkpoint_every_n_steps=10),
    optim=OptimConfig(lr=2e-3, min_lr=2e-4, warmup_steps=2),
    parallel=ParallelConfig(compile=True),
    trainable=["vision", "projector", "llm"],
)
"""


def _train(out: Path, steps: int) -> dict:
    subprocess.run([sys.executable, "-c", JOB, str(out), str(steps)], check=True)
    return json.loads((out / "summary.json").read_text())


def test_tiny_vlm_bf16_on_one_gpu_trains_resumes_and_chats(tmp_path: Path) -> None:
    out = tmp_path / "vlm"
    first = _train(out, 20)
    assert first["final_loss"] < first["first_loss"]
    resumed = _train(out, 30)
    assert resumed["resumed_from"].endswith("step_00000020") and resumed["steps_this_run"] == 10

    from cupola.collections.vlm.generate import chat, load_vlm, media_pixels
    from cupola.toolkit.data.tokenizer import load_tokenizer

    model, _ = load_vlm(out, "cuda")
    video = next(Path(str(out) + "_data").rglob("*.mp4"))
    pixels, marker = media_pixels(model.cfg, video=video, num_frames=8)
    answer = chat(
        model, load_tokenizer("byte"), "What colour is the shape?", pixels, marker, max_new_tokens=8
    )
    assert isinstance(answer, str)
