"""The VLM captioner: a cupola VLM run from a local folder captions every clip that passed the
filters, inside the Ray pipeline (an actor pool), with the same words ``cupola vlm chat`` gives."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cupola.collections.world.curation import curate, load_config, write_curation_corpus
from cupola.recipes.registry import catalog
from cupola.toolkit.testing import spawn


def _train_vlm(rank: int, world: int, out: str, data_root: str) -> None:
    import fiddle as fdl

    recipe = catalog("vlm")["vila_tiny_sft"]()
    recipe.trainer.output_dir = out
    recipe.trainer.max_steps = recipe.trainer.checkpoint_every_n_steps = 2
    recipe.trainer.val_check_interval = None
    recipe.optim.warmup_steps = 1
    recipe.init_from = None
    recipe.data.train_file = str(Path(data_root) / "train.jsonl")
    recipe.data.val_file = None
    recipe.data.micro_batch_size, recipe.data.seq_len = 2, 256
    fdl.build(recipe)()


@pytest.fixture(scope="module")
def vlm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cupola.collections.vlm.data.synthetic import write_synthetic_video_dataset

    root = tmp_path_factory.mktemp("vlm_captioner")
    data = write_synthetic_video_dataset(root / "data", num_videos=4, frames=16, size=32, seed=0)
    spawn(_train_vlm, 1, str(root / "vlm"), str(data["root"]))
    return root / "vlm"


def test_vlm_captions_every_kept_clip_as_chat_would(vlm_run, tmp_path):
    from cupola.collections.vlm.generate import chat, load_vlm, media_pixels
    from cupola.toolkit.data.tokenizer import load_tokenizer

    corpus = write_curation_corpus(
        tmp_path / "in", num_videos=2, shots_per_video=2, degraded=False, broken=False
    )
    cfg = load_config(
        overrides=[
            "annotate.captioner=vlm",
            f"annotate.vlm_checkpoint={vlm_run}",
            "annotate.frames=4",
            "annotate.max_new_tokens=6",
            "dedup.enabled=false",
            "num_cpus=2",
        ]
    )
    result = curate(corpus.root, tmp_path / "out", cfg)
    rows = [r for r in pq.read_table(result.manifest).to_pylist() if r["kind"] == "clip"]
    kept = [r for r in rows if r["decision"] == "kept"]
    assert len(kept) == 4 and all(r["caption"] for r in kept)

    model, run_config = load_vlm(vlm_run)
    tokenizer = load_tokenizer(run_config["data"]["tokenizer"])
    for shard in result.shards:
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            for name in (n for n in names if n.endswith(".mp4")):
                clip = tmp_path / name
                clip.write_bytes(tar.extractfile(name).read())
                record = json.loads(tar.extractfile(name.replace(".mp4", ".json")).read())
                pixels, marker = media_pixels(model.cfg, video=clip, num_frames=4)
                expected = chat(
                    model, tokenizer, cfg.annotate.prompt, pixels, marker, max_new_tokens=6, temperature=0.0
                )
                assert record["caption"] == expected.strip()
