import hashlib
import json
import logging
import random

import numpy as np
import pytest
import torch

from cupola.collections.vlm.data.conversations import (
    IGNORE_INDEX,
    collate_rows,
    first_fit,
    pack,
    parse_conversation,
    prompt_ids,
    read_conversations,
    tokenize_conversation,
)
from cupola.collections.vlm.data.datamodule import PackedConversationDataset, VLMDataModule
from cupola.collections.vlm.data.synthetic import COLOURS, write_synthetic_video_dataset
from cupola.toolkit.config import ConfigError
from cupola.toolkit.data.tokenizer import ByteTokenizer
from cupola.toolkit.data.video import MediaError, read_frames, read_image, to_pixels
from cupola.toolkit.parallel.sequence.multimodal import media_share

TOK = ByteTokenizer()
MEDIA = TOK.vocab_size  # 259, the default placeholder id
TPF = 4  # tokens per frame, as the tiny VILA


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """12 clips of 16 frames (64 px, 8 fps), a third of them in val, and one corrupt training video."""
    return write_synthetic_video_dataset(
        tmp_path_factory.mktemp("synthetic"), num_videos=12, seed=5, corrupt=1
    )


def conversation(turns, media=(), sample_id="s1", base="/data"):
    record = {
        "id": sample_id,
        "media": [{"type": t, "path": p} for t, p in media],
        "conversations": [{"from": r, "value": v} for r, v in turns],
    }
    return parse_conversation(record, base)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def dataset(path, **kw):
    defaults = {"seq_len": 512, "tokens_per_frame": TPF, "image_size": 32, "num_frames": 4}
    return PackedConversationDataset(path, TOK, **{**defaults, **kw})


def test_template_trains_only_the_answers():
    conv = conversation(
        [("human", "<video>\nWhat colour?"), ("gpt", "red"), ("human", "Which way?"), ("gpt", "left")],
        media=[("video", "clip.mp4")],
    )
    tokens, labels = tokenize_conversation(conv, TOK, media_frames=[3], tokens_per_frame=TPF)
    assert tokens.dtype == labels.dtype == np.int64 and tokens.shape == labels.shape
    text = TOK.decode([t if t != MEDIA else ord("#") for t in tokens])
    assert (
        text
        == "<bos>USER: "
        + "#" * 12
        + "\nWhat colour?\nASSISTANT: red<eos>USER: Which way?\nASSISTANT: left<eos>"
    )
    trained = labels != IGNORE_INDEX
    assert TOK.decode(labels[trained]) == "red<eos>left<eos>"
    # labels[t] is the next token: the target of the position before each answer token
    assert np.array_equal(labels[:-1][trained[:-1]], tokens[1:][trained[:-1]])
    assert labels[-1] == IGNORE_INDEX and not trained[tokens == MEDIA].any()

    # the generation prompt is exactly the training sample up to the last answer
    prompt = prompt_ids(
        TOK, "Which way?", history=[("<video>\nWhat colour?", "red")], media_frames=[3], tokens_per_frame=TPF
    )
    assert prompt == tokens[: len(prompt)].tolist()
    assert TOK.decode(tokens[len(prompt) :]) == "left<eos>"
    single = prompt_ids(
        TOK, "<image>\nWhat shape?", media_frames=[1], tokens_per_frame=TPF, media_token_id=300
    )
    assert single.count(300) == TPF and TOK.decode(single[-11:]) == "ASSISTANT: "
    with pytest.raises(ValueError, match="1 media markers but media_frames gives 0"):
        prompt_ids(TOK, "<video> hi", tokens_per_frame=TPF)


def test_template_without_bos():
    class NoBos(ByteTokenizer):
        bos_id = None

    conv = conversation([("human", "hi"), ("gpt", "yo")])
    tokens, labels = tokenize_conversation(conv, NoBos(), media_frames=[], tokens_per_frame=TPF)
    assert TOK.decode(tokens) == "USER: hi\nASSISTANT: yo<eos>"
    assert TOK.decode(labels[labels != IGNORE_INDEX]) == "yo<eos>"


def test_marker_media_mismatch_names_the_sample(tmp_path):
    with pytest.raises(ValueError, match=r"sample 'two'.*2 media markers.*lists 1 files"):
        conversation(
            [("human", "<video><image> q"), ("gpt", "a")], media=[("video", "a.mp4")], sample_id="two"
        )
    with pytest.raises(ValueError, match=r"sample 'kind'.*marker 0 is <image> but media\[0\] is a video"):
        conversation([("human", "<image> q"), ("gpt", "a")], media=[("video", "a.mp4")], sample_id="kind")
    with pytest.raises(ValueError, match=r"sample 'order'.*expected 'gpt'"):
        conversation([("human", "q"), ("human", "a")], sample_id="order")
    with pytest.raises(ValueError, match=r"sample 'gptm'.*gpt\) holds a media marker"):
        conversation([("human", "q"), ("gpt", "<image>")], sample_id="gptm")
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"id": "ok", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            {
                "id": "x9",
                "media": [],
                "conversations": [{"from": "human", "value": "<video> q"}, {"from": "gpt", "value": "a"}],
            },
        ],
    )
    with pytest.raises(ValueError, match=r"bad.jsonl:2: sample 'x9'"):
        read_conversations(bad)
    conv = read_conversations(
        write_jsonl(
            tmp_path / "rel.jsonl",
            [
                {
                    "id": "r",
                    "media": [{"type": "image", "path": "im/a.png"}],
                    "conversations": [
                        {"from": "user", "value": "<image>"},
                        {"from": "assistant", "value": "a"},
                    ],
                }
            ],
        )
    )[0]
    assert conv.media[0].path == tmp_path / "im" / "a.png"  # relative to the JSONL's folder


def sample(sid, length, frames=0):
    return {
        "id": sid,
        "tokens": torch.arange(length) + 1,
        "labels": torch.arange(length) + 101,
        "positions": torch.arange(length),
        "media": torch.full((frames, 3, 2, 2), float(len(sid))),
    }


def test_first_fit_matches_a_plain_first_fit():
    def reference(lengths, cap):
        rows, free = [], []
        for i, n in enumerate(lengths):
            r = next((r for r, f in enumerate(free) if f >= n), None)
            if r is None:
                rows.append([])
                free.append(cap)
                r = len(rows) - 1
            rows[r].append(i)
            free[r] -= n
        return rows

    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 64) for _ in range(rng.randint(1, 80))]
        assert first_fit(lengths, 64) == reference(lengths, 64)
    assert first_fit([6, 5, 2, 3], 8) == [[0, 2], [1, 3]]  # not next-fit: item 2 goes back to row 0


def test_pack_rows_keep_documents_apart():
    rows = pack(
        [sample("a", 6, frames=2), sample("bb", 5), sample("c", 2, frames=1), sample("dd", 3)], 8, pad_id=0
    )
    assert [r["ids"] for r in rows] == [["a", "c"], ["bb", "dd"]]
    row = rows[0]
    assert row["document_ids"].tolist() == [0] * 6 + [1] * 2
    assert row["positions"].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert row["media"][:, 0, 0, 0].tolist() == [1, 1, 1]  # a's 2 frames then c's 1, in row order
    padded = pack([sample("x", 5)], 8, pad_id=258)[0]
    assert padded["tokens"][5:].tolist() == [258] * 3
    assert padded["labels"][5:].tolist() == [IGNORE_INDEX] * 3
    assert padded["document_ids"].tolist() == [0] * 5 + [-1] * 3
    with pytest.raises(ValueError, match=r"sample 'long' is 9 tokens long.*seq_len=8.*fewer frames"):
        pack([sample("long", 9)], 8, pad_id=0)


def test_synthetic_dataset_is_deterministic_and_learnable(synthetic, tmp_path):
    again = write_synthetic_video_dataset(tmp_path, num_videos=12, seed=5, corrupt=1)

    def digest(root):
        return {
            p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    assert digest(synthetic["root"]) == digest(again["root"])
    other = write_synthetic_video_dataset(tmp_path / "other", num_videos=12, seed=6)
    assert other["train"].read_text() != synthetic["train"].read_text()

    train, val = read_conversations(synthetic["train"]), read_conversations(synthetic["val"])
    assert len(val) >= 3 and not {c.media[0].path.stem[3:] for c in train} & {
        c.media[0].path.stem[3:] for c in val
    }
    assert {m.type for c in train for m in c.media} == {"video", "image"}
    assert any(len(c.turns) == 4 for c in train + val)
    assert [c.id for c in train if c.id.startswith("corrupt")] == ["corrupt000"]
    # the answers are true of the pixels: colour from a frame, direction from the frames' order
    for conv in train[:8]:
        if conv.id.startswith("corrupt"):
            continue
        answers = dict(
            zip([t for r, t in conv.turns if r == "human"], [t for r, t in conv.turns if r == "gpt"])
        )
        frames = (
            read_frames(conv.media[0].path, num_frames=2)
            if conv.media[0].type == "video"
            else read_image(conv.media[0].path)[None]
        )
        fg = np.abs(frames.astype(int) - 48).sum(-1) > 60  # not the background
        for question, answer in answers.items():
            if "colour" in question:
                seen = np.median(frames[0][fg[0]], axis=0)
                assert min(COLOURS, key=lambda c: np.abs(seen - COLOURS[c]).sum()) == answer
            if "way" in question:
                (y0, x0), (y1, x1) = (np.argwhere(m).mean(0) for m in fg)
                moved = {"left": x0 - x1, "right": x1 - x0, "up": y0 - y1, "down": y1 - y0}
                assert max(moved, key=moved.get) == answer


def test_media_tokens_and_order(synthetic, tmp_path):
    root = synthetic["root"]
    records = [
        {
            "id": "mix",
            "media": [
                {"type": "video", "path": str(root / "videos/vid001.mp4")},
                {"type": "image", "path": str(root / "images/img000.png")},
            ],
            "conversations": [
                {"from": "human", "value": "<video> then <image>: same?"},
                {"from": "gpt", "value": "no"},
            ],
        },
        {
            "id": "text",
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
        },
    ]
    path = write_jsonl(tmp_path / "mix.jsonl", records)
    # fps: the 16 frames at 8 fps sampled at 4 fps are 8 frames, capped at 6
    for sampling, frames in (({"num_frames": 5}, 5), ({"fps": 4, "num_frames": None, "max_frames": 6}, 6)):
        ds = dataset(path, shuffle=False, **sampling)
        mix = ds.sample(0)
        assert mix["id"] == "mix" and int((mix["tokens"] == MEDIA).sum()) == (frames + 1) * TPF
        video = to_pixels(read_frames(root / "videos/vid001.mp4", size=(32, 32), **sampling), 32)
        image = to_pixels(read_image(root / "images/img000.png", size=(32, 32))[None], 32)
        assert torch.equal(mix["media"], torch.cat([video, image]))  # video frames in order, then the image
        assert ds.sample(1)["media"].shape == (0, 3, 32, 32)


def test_too_long_samples_error_or_are_skipped(synthetic):
    with pytest.raises(
        ValueError,
        match=r"sample 'vid\d+' is \d+ tokens long \(8 frames x 4 tokens.*seq_len=60.*fewer frames",
    ):
        dataset(synthetic["val"], seq_len=60, num_frames=8)
    ds = dataset(synthetic["val"], seq_len=60, num_frames=8, on_too_long="skip")
    n = len(read_conversations(synthetic["val"]))
    assert ds.stats["skipped_too_long"] > 0 and ds.stats["samples"] == n - ds.stats["skipped_too_long"]
    assert all(c.media[0].type == "image" for c, _ in ds.samples)  # only the short image samples fit


def test_bad_media_errors_name_file_and_sample_or_are_skipped(synthetic, tmp_path, caplog):
    corrupt = synthetic["corrupt"][0]
    with pytest.raises(MediaError, match=rf"sample 'corrupt000': video {corrupt} cannot be opened"):
        dataset(synthetic["train"])
    # two samples on one missing file: both skipped, one warning
    records = [json.loads(line) for line in synthetic["train"].read_text().splitlines()]
    good = next(r for r in records if r["id"].startswith("vid"))
    good["media"] = [{**m, "path": str(synthetic["root"] / m["path"])} for m in good["media"]]
    missing = {"type": "video", "path": str(tmp_path / "gone.mp4")}
    records = [good] + [{**good, "id": f"m{k}", "media": [missing]} for k in range(2)]
    path = write_jsonl(tmp_path / "missing.jsonl", records)
    with pytest.raises(MediaError, match=rf"sample 'm0': video {tmp_path / 'gone.mp4'} does not exist"):
        dataset(path)
    with caplog.at_level(logging.WARNING):
        ds = dataset(path, on_bad_media="skip")
    assert [c.id for c, _ in ds.samples] == [good["id"]]
    assert (ds.stats["skipped_bad_media"], ds.stats["bad_files"]) == (2, 1)
    assert len([r for r in caplog.records if "gone.mp4" in r.getMessage()]) == 1
    # a file that breaks after the build: error names it, or its sample becomes ignored padding
    media_path = tmp_path / "late.mp4"
    media_path.write_bytes((synthetic["root"] / "videos" / "vid000.mp4").read_bytes())
    late = {**good, "media": [{"type": "video", "path": str(media_path)}]}
    ds = dataset(write_jsonl(tmp_path / "late.jsonl", [late]), on_bad_media="skip")
    media_path.write_bytes(b"broken")
    row = ds[0]
    assert (row["labels"] == IGNORE_INDEX).all() and row["media"].shape[0] == 0
    ds.on_bad_media = "error"
    with pytest.raises(MediaError, match=rf"sample '{good['id']}': video {media_path}"):
        ds[0]


def make_dm_args(synthetic):
    return {
        "train_file": str(synthetic["train"]),
        "val_file": str(synthetic["val"]),
        "tokens_per_frame": TPF,
        "image_size": 32,
        "seq_len": 256,
        "micro_batch_size": 2,
        "num_frames": 4,
        "on_bad_media": "skip",
        "seed": 3,
    }


def make_dm(synthetic, **kw):
    dm = VLMDataModule(**{**make_dm_args(synthetic), **kw})
    dm.setup("fit")
    return dm


def test_datamodule_batches(synthetic):
    dm = make_dm(synthetic)
    assert dm.media_token_id == MEDIA and dm.train_dataset.stats["skipped_bad_media"] == 1
    batch = next(iter(dm.train_dataloader()))
    assert {k: tuple(v.shape) for k, v in batch.items() if torch.is_tensor(v)} == {
        "tokens": (2, 256),
        "labels": (2, 256),
        "positions": (2, 256),
        "document_ids": (2, 256),
        "media": (int((batch["tokens"] == MEDIA).sum()) // TPF, 3, 32, 32),
    }
    assert batch["media"].dtype == torch.float32 and -1 <= batch["media"].min() and batch["media"].max() <= 1
    docs, pos = batch["document_ids"], batch["positions"]
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    assert (pos[starts & (docs >= 0)] == 0).all() and (pos[~starts & (docs >= 0)] > 0).all()
    assert (batch["labels"][docs < 0] == IGNORE_INDEX).all() and (
        batch["tokens"][docs < 0] == TOK.pad_id
    ).all()
    assert [len(ids) for ids in batch["ids"]] == [int(d.max()) + 1 for d in docs]
    # every sample's media in row order: frames per row = that row's placeholders / TPF
    frames = [int((row == MEDIA).sum()) // TPF for row in batch["tokens"]]
    rows = [dm.train_dataset[i] for i in range(len(dm.train_dataset))]
    by_ids = {tuple(r["ids"]): r for r in rows}
    expected = torch.cat([by_ids[tuple(ids)]["media"] for ids in batch["ids"]])
    assert torch.equal(batch["media"], expected) and sum(frames) == len(expected)
    assert len(list(dm.val_dataloader())) == -(-len(dm.val_dataset) // 2)


def test_datamodule_resumes_at_the_exact_batch(synthetic):
    dm = make_dm(synthetic, micro_batch_size=1)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    expected = [next(it), next(it)]

    resumed = make_dm(synthetic, micro_batch_size=1).train_dataloader()
    resumed.load_state_dict(state)
    got = list(iter(resumed))[:2]
    for a, b in zip(expected, got):
        assert a["ids"] == b["ids"]
        assert all(
            torch.equal(a[k], b[k]) for k in ("tokens", "labels", "positions", "document_ids", "media")
        )


def test_datamodule_ranks_read_disjoint_rows(synthetic):
    shares = []
    for rank in range(2):
        dm = make_dm(synthetic, micro_batch_size=1, seq_len=128)
        dm.dp_rank, dm.dp_size = rank, 2
        shares.append({i for b in dm.train_dataloader() for ids in b["ids"] for i in ids})
    assert shares[0] and shares[1] and not shares[0] & shares[1]


def test_sequence_parallel_ranks_decode_only_their_share_of_the_batch_frames(synthetic, tmp_path, caplog):
    """Under SP (sp_size=3) the ranks of a group get the same rows and each decodes only its share of
    the batch's frames: the shares, in rank order, are exactly the frames one process decodes."""
    whole = list(make_dm(synthetic, seq_len=128).train_dataloader())
    parts = []
    for rank in range(3):
        dm = VLMDataModule(**{**make_dm_args(synthetic), "seq_len": 128})
        dm.sp_rank, dm.sp_size = rank, 3
        dm.setup("fit")
        parts.append(list(dm.train_dataloader()))
    assert len(whole) > 1
    for b, batch in enumerate(whole):
        total = batch["media"].shape[0]
        assert total > 3
        for rank in range(3):
            part = parts[rank][b]
            assert part["ids"] == batch["ids"]
            assert all(
                torch.equal(part[k], batch[k]) for k in ("tokens", "labels", "positions", "document_ids")
            )
            share = media_share(total, 3, rank)
            assert part["media_share"].tolist() == [share.start, share.stop, total]
            assert torch.equal(part["media"], batch["media"][share])
    # a file that breaks after the build: this rank names it, or trains on blank frames with a warning
    dm = VLMDataModule(**make_dm_args(synthetic))
    dm.sp_rank, dm.sp_size = 0, 2
    dm.setup("fit")
    ds = dm.train_dataset
    sample_id, media, frames = ds[0]["media_refs"][0]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"broken")
    media = type(media)(type=media.type, path=broken)
    with caplog.at_level(logging.WARNING):
        blank = ds.frames_part(sample_id, media, frames, slice(0, 2))
    assert torch.equal(blank, torch.zeros(2, 3, 32, 32)) and "blank frames" in caplog.text
    ds.on_bad_media = "error"
    with pytest.raises(MediaError, match=rf"sample '{sample_id}': video {broken}"):
        ds.frames_part(sample_id, media, frames, slice(0, 2))
    with pytest.raises(ConfigError, match="sp_rank=2 is not in"):
        dm.sp_rank = 2
        dm.setup("fit")


def test_datamodule_config_errors(synthetic):
    with pytest.raises(ConfigError, match="exactly one of num_frames and fps"):
        make_dm(synthetic, fps=2)
    with pytest.raises(ConfigError, match="max_frames=4 is not valid: only caps fps"):
        make_dm(synthetic, max_frames=4)
    with pytest.raises(ConfigError, match="on_bad_media='ignore'"):
        make_dm(synthetic, on_bad_media="ignore")
    with pytest.raises(ConfigError, match="media_token_id=257"):
        make_dm(synthetic, media_token_id=257)  # the byte tokenizer's eos
    with pytest.raises(ConfigError, match="micro_batch_size=0"):
        make_dm(synthetic, micro_batch_size=0)
    with pytest.raises(ConfigError, match="less than one batch of micro_batch_size=64"):
        make_dm(synthetic, micro_batch_size=64)
    with pytest.raises(FileNotFoundError, match="train_file"):
        make_dm(synthetic, train_file="/nonexistent.jsonl")
    assert make_dm(synthetic, fps=2, num_frames=None, max_frames=3).fps == 2


def test_packed_samples_compute_what_they_compute_alone(synthetic):
    """The batch contract with the tiny VILA: placeholders match the frames, and a sample packed after
    another gets the logits it gets alone (document_ids keep attention inside it, positions restart)."""
    from cupola.collections.vlm.models.vila import VILA, vila_config

    cfg = vila_config("tiny")
    dm = make_dm(
        synthetic, tokens_per_frame=cfg.tokens_per_frame, image_size=cfg.vision.image_size, micro_batch_size=1
    )
    torch.manual_seed(0)
    model = VILA(cfg)
    model.init_weights()
    model.eval()
    ds = dm.train_dataset
    i = next(i for i, samples in enumerate(ds.rows) if len(samples) >= 2)
    batch = collate_rows([ds[i]])
    second = ds.sample(ds.rows[i][1])
    with torch.no_grad():
        packed = model(batch["tokens"], batch["media"], batch["positions"], batch["document_ids"])
        alone = model(second["tokens"][None], second["media"], second["positions"][None])
    span = batch["document_ids"][0] == 1
    assert torch.allclose(packed[0, span], alone[0], atol=1e-5)
