"""Semantic deduplication: clip embeddings, k-means, and a cosine-distance threshold.

Embeddings are computed while a clip is decoded (from ``embed_frames`` of its sampled frames at
``embed_size``; see :func:`load_embedder` for the choices) and stored with the clip, so the global
step runs on vectors alone: :func:`semantic_dedup` clusters the clips that passed the filters with
scikit-learn's k-means (fixed seed, clips in key order, one thread: the same clusters on every
run), then walks each cluster in key order and drops a clip whose cosine distance to a clip already
kept in its cluster is below the threshold, recording the nearest such clip. As in SemDeDup,
near-duplicates split across two clusters are not compared.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cupola.collections.world.curation.config import DedupConfig
from cupola.toolkit.config import ConfigError

__all__ = ["load_embedder", "semantic_dedup", "thumbnail_embedding"]

Embedder = Callable[[np.ndarray], np.ndarray]  # uint8 [N, S, S, 3] RGB -> float [D]


def _unit(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64) - v.mean()
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


def thumbnail_embedding(frames_N_S_S_3: np.ndarray) -> np.ndarray:
    """A cheap appearance vector: the clip's mean 8x8 colour thumbnail (layout) and its mean HSV
    histogram (8 hues x 4 saturations x 4 values, square-rooted: colour content), each centred and
    L2-normalised, concatenated and normalised again (``float32 [320]``)."""
    import cv2

    frames = np.asarray(frames_N_S_S_3, dtype=np.uint8)
    thumbs = np.stack([cv2.resize(f, (8, 8), interpolation=cv2.INTER_AREA) for f in frames]).astype(
        np.float64
    )
    hists = [
        cv2.calcHist(
            [cv2.cvtColor(f, cv2.COLOR_RGB2HSV)], [0, 1, 2], None, [8, 4, 4], [0, 180, 0, 256, 0, 256]
        )
        for f in frames
    ]
    hist = np.mean([h.ravel() / max(h.sum(), 1.0) for h in hists], axis=0)
    vector = np.concatenate([_unit(thumbs.mean(axis=0).ravel()), _unit(np.sqrt(hist))])
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def _model_embedder(path: str) -> Embedder:
    from cupola.collections.world.curation.filters import frames_to_tensor, load_torch_model

    model = load_torch_model(path)

    def embed(frames_N_S_S_3: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            out_N_D = torch.as_tensor(model(frames_to_tensor(frames_N_S_S_3)), dtype=torch.float32)
        return out_N_D.reshape(len(frames_N_S_S_3), -1).mean(0).numpy()

    return embed


def load_embedder(spec: str) -> Embedder:
    """``"thumbnail"`` (:func:`thumbnail_embedding`), ``"package.module:function"``, or the path of a
    local TorchScript / torch model file (``float32 [N, 3, S, S]`` in [0, 1] -> ``[N, D]``, averaged)."""
    if spec == "thumbnail":
        return thumbnail_embedding
    if Path(spec).expanduser().suffix in (".pt", ".pth", ".jit", ".ts"):
        return _model_embedder(spec)
    module, sep, name = spec.partition(":")
    if not sep:
        raise ConfigError(
            f"dedup.embedding={spec!r} is not valid: use 'thumbnail', 'package.module:function', or a "
            "local model file (.pt/.pth/.jit/.ts)"
        )
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"dedup.embedding={spec!r}: cannot import it ({e})") from e


def semantic_dedup(keys: list[str], embeddings_N_D: np.ndarray, cfg: DedupConfig) -> dict[str, str]:
    """``{duplicate key: key of the kept clip it duplicates}`` for clips ``keys`` (sorted, unique)
    with these embeddings (see the module docstring)."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    if list(keys) != sorted(set(keys)):
        raise ValueError("semantic_dedup needs unique keys in sorted order")
    if len(keys) < 2:
        return {}
    x_N_D = np.asarray(embeddings_N_D, dtype=np.float64)
    x_N_D = x_N_D / np.maximum(np.linalg.norm(x_N_D, axis=1, keepdims=True), 1e-12)
    clusters = min(len(keys), max(1, round(len(keys) / cfg.clips_per_cluster)))
    with threadpool_limits(1):
        labels = KMeans(n_clusters=clusters, random_state=cfg.seed, n_init=1).fit_predict(x_N_D)
        duplicates: dict[str, str] = {}
        for cluster in range(clusters):
            kept: list[int] = []
            for i in np.flatnonzero(labels == cluster):  # ascending: key order
                if kept:
                    distance = 1.0 - x_N_D[kept] @ x_N_D[i]
                    nearest = int(np.argmin(distance))
                    if distance[nearest] < cfg.threshold:
                        duplicates[keys[i]] = keys[kept[nearest]]
                        continue
                kept.append(int(i))
    return duplicates
