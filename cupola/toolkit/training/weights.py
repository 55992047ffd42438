"""Initial weights loaded straight into a sharded model, each rank reading only its own shards.

A *weight source* maps parameter names to lazily sliceable tensors (``.shape``, ``.dtype``,
``source[slices] -> Tensor``): slices of a safetensors file (memory-mapped, nothing else read), of
an in-memory tensor, or computed on demand (an upcycled expert built from the dense MLP only for
the experts a rank holds). :func:`load_sources` hands them to ``torch.distributed.checkpoint``
through a small ``StorageReader``: DCP's planner works out, for every FSDP/TP/EP shard, which
global slice each rank needs, and the reader produces exactly that slice.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

Slices = tuple[slice, ...]


class SliceSource(Protocol):
    shape: torch.Size
    dtype: torch.dtype

    def __getitem__(self, slices: Slices) -> torch.Tensor: ...


class TensorSource:
    """An in-memory tensor as a source."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.shape, self.dtype = tensor.shape, tensor.dtype

    def __getitem__(self, slices: Slices) -> torch.Tensor:
        return self.tensor[slices]


class FnSource:
    """A tensor computed on demand: ``fn(slices)`` returns that slice of the (never built) whole."""

    def __init__(
        self, shape: tuple[int, ...], dtype: torch.dtype, fn: Callable[[Slices], torch.Tensor]
    ) -> None:
        self.shape, self.dtype, self.fn = torch.Size(shape), dtype, fn

    def __getitem__(self, slices: Slices) -> torch.Tensor:
        return self.fn(slices)


_ST_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
}


class SafetensorsSource:
    """One tensor of a safetensors file; a slice reads only its bytes (the file is memory-mapped)."""

    def __init__(self, file: str | Path, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.file, self.key = str(file), key
        self.shape, self.dtype = torch.Size(shape), dtype

    def __getitem__(self, slices: Slices) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.file, framework="pt") as f:
            return f.get_slice(self.key)[slices]


def safetensors_sources(folder: str | Path) -> dict[str, SafetensorsSource]:
    """Lazy sources for every tensor of an HF checkpoint folder (single file or sharded with an index)."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = (
        sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        if index.is_file()
        else [folder / "model.safetensors"]
    )
    sources: dict[str, SafetensorsSource] = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} not found (listed by {index})" if index.is_file() else f"{file} not found"
            )
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                sources[key] = SafetensorsSource(
                    file, key, tuple(piece.get_shape()), _ST_DTYPES[piece.get_dtype()]
                )
    return sources


class _SourceReader(StorageReader):
    """DCP reader serving slices of :class:`SliceSource` objects (one chunk per tensor)."""

    def __init__(self, sources: Mapping[str, SliceSource]) -> None:
        super().__init__()
        self.sources = sources

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        entries = {}
        for key, source in self.sources.items():
            size = torch.Size(source.shape)
            chunk = ChunkStorageMetadata(offsets=torch.Size([0] * len(size)), sizes=size)
            entries[key] = TensorStorageMetadata(TensorProperties(dtype=source.dtype), size, [chunk])
        return Metadata(state_dict_metadata=entries)

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        for item in plan.items:
            index: MetadataIndex = item.storage_index
            slices = tuple(slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths, strict=True))
            value = self.sources[index.fqn][slices]
            target = planner.resolve_tensor(item).detach()
            if tuple(target.shape) != tuple(value.shape):
                raise RuntimeError(
                    f"{index.fqn}{list(slices)}: source gave {tuple(value.shape)}, need {tuple(target.shape)}"
                )
            target.copy_(value)
            planner.commit_tensor(item, target)
        done: Future[None] = Future()
        done.set_result(None)
        return done


def load_sources(
    model: nn.Module, sources: Mapping[str, SliceSource], *, keep: Callable[[str], bool] | None = None
) -> None:
    """Fill every parameter and buffer of ``model`` (plain, FSDP/TP/EP-sharded) from ``sources``.

    Strict: missing or unexpected names and shape mismatches are errors that name them — except
    names for which ``keep(name)`` is true and that no source provides: those keep their current
    (initialized) values (e.g. a new VLM projector when only the vision tower and the LLM come
    pretrained, or fresh LoRA adapters on a pretrained model). Under
    torch.distributed every rank calls this; each reads only the slices its shards need.
    """
    state = get_model_state_dict(model)
    if keep is not None:
        state = {k: v for k, v in state.items() if k in sources or not keep(k)}
    missing, unexpected = sorted(set(state) - set(sources)), sorted(set(sources) - set(state))
    if missing or unexpected:
        raise KeyError(
            f"initial weights do not fit the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    wrong = [
        (k, tuple(sources[k].shape), tuple(v.shape)) for k, v in state.items() if sources[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(f"initial weights have the wrong shapes (name, source, model): {wrong[:8]}")
    with warnings.catch_warnings():  # one process, no process group: exactly the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=_SourceReader(sources))
    set_model_state_dict(model, state, options=StateDictOptions(strict=keep is None))
