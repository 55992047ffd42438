"""Context extension: LongVILA's RoPE base schedule, ``extend_context`` configs and their errors, and a
tiny model trained at 64 tokens that keeps a sane loss at 256 once extended and briefly fine-tuned."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from cupola.collections.llm.models.gpt import GPT, GPTConfig, RopeScaling, gpt_config
from cupola.collections.vlm.context_extension import (
    LONGVILA_ROPE_SCHEDULE,
    extend_context,
    rope_base_for_length,
)
from cupola.toolkit.config import ConfigError
from cupola.toolkit.data.corpus import default_corpus_documents
from cupola.toolkit.data.tokenizer import ByteTokenizer


def test_longvila_schedule_values_and_rounding_up():
    # NVlabs/VILA longvila/train/4_extend_llm_{64k,256k,512k,1M}.sh
    assert rope_base_for_length(131072) == 15_300_000.0
    assert rope_base_for_length(262144) == 207_112_184.0
    assert rope_base_for_length(524288) == 1_062_356_830.0
    assert rope_base_for_length(1048576) == 3_580_165_449.0
    # Between entries (and below the first) the next longer entry's base.
    assert rope_base_for_length(131073) == rope_base_for_length(200_000) == 207_112_184.0
    assert rope_base_for_length(600_000) == 3_580_165_449.0
    assert rope_base_for_length(32768) == 15_300_000.0
    bases = [rope_base_for_length(n) for n in sorted(LONGVILA_ROPE_SCHEDULE)]
    assert bases == sorted(bases)
    assert rope_base_for_length(300, schedule={256: 1e5, 1024: 1e6}) == 1e6


def test_schedule_errors():
    with pytest.raises(ConfigError, match=r"target_len=1048577 .*ends at 1048576.*rope_theta="):
        rope_base_for_length(1048577)
    with pytest.raises(ConfigError, match=r"target_len=0 .*integer >= 1"):
        rope_base_for_length(0)
    with pytest.raises(ConfigError, match=r"schedule=\{\} .*at least one entry"):
        rope_base_for_length(10, schedule={})


def test_extend_context_rope_base():
    cfg = gpt_config("llama3_8b")  # 8192 tokens, base 5e5, no scaling
    out = extend_context(cfg, 131072)
    assert (out.max_seq_len, out.rope_theta, out.rope_scaling) == (131072, 15_300_000.0, None)
    assert (cfg.max_seq_len, cfg.rope_theta) == (8192, 500_000.0)  # the input is not modified
    assert dataclasses.replace(out, max_seq_len=8192, rope_theta=500_000.0) == cfg
    assert extend_context(cfg, 20_000, rope_theta=2e6).rope_theta == 2e6
    # Llama 3.1-style scaling is kept (and not shared with the input) when only the base moves.
    llama31 = gpt_config("llama3_2_1b")
    longer = extend_context(llama31, 262144)
    assert longer.rope_scaling == llama31.rope_scaling and longer.rope_scaling is not llama31.rope_scaling
    assert longer.rope_theta == 207_112_184.0


@pytest.mark.parametrize("method", ["linear", "ntk", "yarn"])
def test_extend_context_frequency_scaling(method):
    cfg = gpt_config("tiny", max_seq_len=64)
    out = extend_context(cfg, 256, method=method)
    reference = {"original_max_position_embeddings": 64} if method == "yarn" else {}
    assert out.rope_scaling == RopeScaling(kind=method, factor=4.0, **reference)
    assert (out.max_seq_len, out.rope_theta) == (256, cfg.rope_theta)
    assert extend_context(cfg, 256, method=method, factor=8.0).rope_scaling.factor == 8.0
    GPT(out)  # builds: its tables cover 256 positions


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_len": 32}, r"target_len=32 .*longer than the config's max_seq_len \(64\)"),
        (
            {"target_len": 256, "method": "dynamic"},
            r"method='dynamic' .*\['rope_base', 'linear', 'ntk', 'yarn'\]",
        ),
        ({"target_len": 256, "method": "rope_base", "factor": 4.0}, r"factor=4.0 .*only methods 'linear'"),
        (
            {"target_len": 256, "method": "yarn", "rope_theta": 1e6},
            r"rope_theta=1000000.0 .*only method 'rope_base'",
        ),
        (
            {"target_len": 256, "rope_theta": 5000.0},
            r"rope_theta=5000.0 .*larger than the config's rope_theta",
        ),
        ({"target_len": 256, "method": "linear", "factor": 0.5}, r"RopeScaling.factor=0.5"),
        ({"target_len": 2**21}, r"ends at 1048576"),
    ],
)
def test_extend_context_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        extend_context(gpt_config("tiny", max_seq_len=64), **kwargs)


def test_extend_context_refuses_to_stack_scalings():
    with pytest.raises(ConfigError, match=r"already rescales .*method='rope_base'"):
        extend_context(gpt_config("llama3_2_1b"), 262144, method="yarn")


# --- the acceptance test: trained at 64 tokens, evaluated at 256 (4x) -----------------------------

SHORT, LONG = 64, 256


def _corpus_splits() -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded corpus as one byte stream; the last 10% is held out for evaluation."""
    tok = ByteTokenizer()
    ids: list[int] = []
    for doc in default_corpus_documents():
        ids += [tok.bos_id, *tok.encode(doc), tok.eos_id]
    stream = torch.tensor(ids)
    split = int(len(stream) * 0.9)
    return stream[:split], stream[split:]


def _train(
    model: GPT, stream: torch.Tensor, seq_len: int, *, steps: int, batch: int, lr: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=g)
        x = torch.stack([stream[s : s + seq_len + 1] for s in starts])
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        warmup.step()


@torch.no_grad()
def _token_losses(model: GPT, stream: torch.Tensor, seq_len: int, windows: int = 32) -> torch.Tensor:
    """Per-token losses ``[windows, seq_len]`` on evenly spaced held-out windows."""
    stride = (len(stream) - seq_len - 1) // windows
    x = torch.stack([stream[i * stride : i * stride + seq_len + 1] for i in range(windows)])
    logits = model.eval()(x[:, :-1])
    model.train()
    return F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(windows, seq_len)


@pytest.fixture(scope="module")
def long_context_losses() -> dict[str, float]:
    """Mean loss of the tokens at positions ``SHORT..LONG-1`` (positions the short model never saw),
    as a multiple of the short model's loss at ``SHORT``: zero-shot and after a 40-step fine-tune at
    ``LONG``, for the un-extended config and each method."""
    torch.manual_seed(0)
    train_stream, val_stream = _corpus_splits()
    cfg = gpt_config("tiny", max_seq_len=SHORT)  # 2 layers, dim 64, head_dim 16, base 1e4
    model = GPT(cfg)
    _train(model, train_stream, SHORT, steps=300, batch=16, lr=3e-3, seed=1)
    weights = model.state_dict()
    short = _token_losses(model, val_stream, SHORT).mean().item()
    # LongVILA's first stage takes its Qwen2 LLM (rope_theta 1e6, 32768 tokens in Qwen2-7B-Instruct's
    # config.json) to 131072 tokens: 4x the context for 15.3x the base. The same step here.
    tiny_schedule = {LONG: cfg.rope_theta * LONGVILA_ROPE_SCHEDULE[131072] / 1e6}
    configs: dict[str, GPTConfig] = {
        "none": dataclasses.replace(cfg, max_seq_len=LONG),  # longer tables, same frequencies
        "rope_base": extend_context(cfg, LONG, rope_theta=rope_base_for_length(LONG, schedule=tiny_schedule)),
        **{m: extend_context(cfg, LONG, method=m) for m in ("linear", "ntk", "yarn")},
    }
    result = {"short_loss": short}
    for name, long_cfg in configs.items():
        extended = GPT(long_cfg)
        extended.load_state_dict(weights)
        result[f"{name}/zero_shot"] = (
            _token_losses(extended, val_stream, LONG)[:, SHORT:].mean().item() / short
        )
        _train(extended, train_stream, LONG, steps=40, batch=4, lr=1e-3, seed=2)
        result[f"{name}/tuned"] = _token_losses(extended, val_stream, LONG)[:, SHORT:].mean().item() / short
    print({k: round(v, 3) for k, v in result.items()})
    return result


def test_unextended_model_degrades_past_its_training_length(long_context_losses):
    r = long_context_losses
    assert r["short_loss"] < 2.2  # it learned the text (byte unigram entropy of the corpus: 3.26 nats)
    # Relative distances 64..255 turn the middle frequencies (pairs 3-5 of 8 at base 1e4) past any
    # angle they reached within 64 tokens: attention scores the model never learned to read.
    assert r["none/zero_shot"] > 1.2


@pytest.mark.parametrize("method", ["rope_base", "ntk", "yarn"])
def test_extended_model_keeps_a_sane_loss_at_4x_length(long_context_losses, method):
    r = long_context_losses
    # Without training, the extension already keeps the new distances closer to trained angles ...
    assert r[f"{method}/zero_shot"] < r["none/zero_shot"]
    # ... and after a short fine-tune at 256 the long-context loss is that of the short context,
    assert r[f"{method}/tuned"] < 1.1
    # better than the same fine-tune gives the un-extended model.
    assert r[f"{method}/tuned"] < r["none/tuned"]


def test_linear_interpolation_loses_local_resolution(long_context_losses):
    """Linear interpolation also divides the fastest frequencies by 4: neighbouring bytes, which a
    byte-level model leans on most, become 4x harder to tell apart. YaRN keeps those frequencies."""
    r = long_context_losses
    assert r["yarn/zero_shot"] < r["linear/zero_shot"]
    assert r["yarn/tuned"] < r["linear/tuned"]
    assert r["linear/tuned"] < r["none/zero_shot"]  # still a working model after the fine-tune
