"""The tiny VLM on CUDA: bf16 on one process (single-process mixed precision, MixedPrecisionAdamW
with bf16 working copies, compiled LLM blocks) through Lightning, resumed from its checkpoint, then
chat on the GPU; a LoRA stage on top of it. Skipped without a GPU. Each run is its own process, as a real job is."""

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
from cupola.toolkit.modules.lora import LoRAConfig
from cupola.toolkit.training.configs import OptimConfig, ParallelConfig, TrainerConfig

out, steps, init_from = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None
lora = LoRAConfig() if init_from else None
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
    trainable=["llm"] if lora else ["vision", "projector", "llm"],
    init_from=init_from,
    lora=lora,
)
"""


def _train(out: Path, steps: int, init_from: Path | None = None) -> dict:
    subprocess.run([sys.executable, "-c", JOB, str(out), str(steps), str(init_from or "")], check=True)
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


def test_lora_stage_in_bf16_keeps_frozen_weights_bit_identical(tmp_path: Path) -> None:
    """LoRA on the LLM with bf16 working copies and compiled blocks: the frozen weights (base
    projections, MLPs, vision, projector) come out bit-identical, the adapters train, and the merged
    model chats."""
    from cupola.collections.vlm.generate import load_vlm
    from cupola.toolkit.training.checkpoint import latest_checkpoint, load_model_weights

    base = tmp_path / "base"
    _train(base, 10)
    lora = tmp_path / "lora"
    summary = _train(lora, 20, init_from=base)
    assert summary["final_loss"] < summary["first_loss"]
    assert summary["trainable_parameters"] < summary["parameters"] / 2
    before = load_model_weights(latest_checkpoint(base / "checkpoints"))
    after = load_model_weights(latest_checkpoint(lora / "checkpoints"))
    for name, value in before.items():
        trains = name.startswith("model.llm.") and ("norm." in name or "tok_embeddings" in name)
        assert torch.equal(value, after[name]) != trains, name
    assert all(after[k].abs().sum() > 0 for k in after if k.endswith("lora_b"))
    model, run_config = load_vlm(lora, "cuda")
    assert run_config["lora"]["rank"] == 8 and not any("lora" in k for k in model.state_dict())
