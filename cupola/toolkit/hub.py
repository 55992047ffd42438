"""Hugging Face checkpoint folders: find them offline, read and write safetensors + config.json.

Nothing here downloads. A repo id is looked up in the local Hugging Face cache only
(``snapshot_download(..., local_files_only=True)``); fetch it beforehand on a machine with
network access (``hf download ORG/NAME``), or pass a local folder.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["hf_cache_dir", "load_state_dict", "read_config", "resolve_checkpoint_dir", "save_checkpoint"]

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hf_cache_dir() -> Path:
    """The HF hub cache, read from the environment at call time (``HF_HUB_CACHE``, then ``HF_HOME``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_checkpoint_dir(path_or_repo_id: str | os.PathLike[str]) -> Path:
    """A local checkpoint folder, or the cached snapshot of a repo id (``"meta-llama/Llama-3.2-1B"``)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; pass the checkpoint folder that holds config.json")
    name = str(path_or_repo_id)
    cache = hf_cache_dir()
    if _REPO_ID.match(name):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name, cache_dir=cache, local_files_only=True))
        except Exception:  # any failure here means "not in the local cache"
            pass
        where = (
            f"no local folder {path.absolute()}, and repo {name!r} is not in the Hugging Face cache {cache}"
        )
        repo_id = name
    else:
        where = f"no local folder {path.absolute()} ({name!r} is not a Hugging Face repo id ORG/NAME either)"
        repo_id = "ORG/NAME"
    raise FileNotFoundError(
        f"checkpoint not found: {where}. cupola never downloads. Pass a local folder holding config.json "
        f"and *.safetensors, or fetch the model on a machine with network access with `hf download {repo_id}` "
        f"(older huggingface_hub: `huggingface-cli download {repo_id}`) and make that cache visible here "
        f"(HF_HUB_CACHE={cache})."
    )


def read_config(checkpoint_dir: str | os.PathLike[str]) -> dict:
    path = Path(checkpoint_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a Hugging Face checkpoint folder holds config.json")
    return json.loads(path.read_text())


def load_state_dict(checkpoint_dir: str | os.PathLike[str], stem: str = "model") -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors``, or of the shards listed in ``model.safetensors.index.json``
    (``stem``: another file name, e.g. diffusers' ``diffusion_pytorch_model``)."""
    folder = Path(checkpoint_dir)
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        state_dict: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state_dict.update(load_file(folder / shard))
        missing = sorted(set(weight_map) - set(state_dict))
        if missing:
            raise ValueError(f"{index} lists tensors that no shard holds: {missing[:10]}")
        return state_dict
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(
        f"no {single.name} or {index.name} in {folder} (found: {present}); "
        "only safetensors checkpoints are read"
    )


def _plain(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors that share no memory (safetensors refuses aliases)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state_dict.items():
        t = tensor.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        out[name] = t
    return out


def save_checkpoint(
    out_dir: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    config: dict,
    max_shard_size: int = 5 * 2**30,
) -> Path:
    """Write ``config.json`` and the tensors as safetensors shards of at most ``max_shard_size`` bytes.

    One shard is written as ``model.safetensors``; several as ``model-0000i-of-0000n.safetensors``
    plus ``model.safetensors.index.json`` (the layout ``from_pretrained`` reads). A tensor larger
    than ``max_shard_size`` gets a shard of its own.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _plain(state_dict)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        if shards[-1] and shard_bytes + size > max_shard_size:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = t
        shard_bytes += size
    # Remove files a previous save may have left, so the folder holds exactly one checkpoint.
    for stale in [
        *out.glob("model-*-of-*.safetensors"),
        out / SAFETENSORS_NAME,
        out / SAFETENSORS_INDEX_NAME,
    ]:
        stale.unlink(missing_ok=True)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], out / SAFETENSORS_NAME, metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / file, metadata=metadata)
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / SAFETENSORS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
