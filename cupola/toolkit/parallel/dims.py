"""Parallel degrees, checked against the world size, and the named DeviceMesh they build.

Layout (outermost first): ``dp_replicate × dp_shard × sp × tp``. Data-parallel ranks
(``dp_replicate × dp_shard``) see different batches; sequence- and tensor-parallel ranks
of one data-parallel rank see the same batch. FSDP shards parameters over
``dp_shard × sp`` (as torchtitan shards over dp_shard × cp). Expert parallelism borrows
its ranks from ``dp_shard × sp``: with ``ep > 1`` the ``dp_shard`` dimension is split into
``dp_shard_mod_ep × dp_shard_in_ep`` and ``ep = dp_shard_in_ep × sp``.

Sequence parallelism is a grid ``sp = sp_ring × sp_ulysses`` (Ulysses innermost, so its
all-to-alls stay within a node; see :mod:`cupola.toolkit.parallel.sequence`): ``sp_ulysses=-1``
(default) makes it all Ulysses, ``sp_ulysses=1`` all ring; ``sp_zigzag`` orders the ring's chunks
for causal load balance.

Mesh dimension names (always present, size 1 when unused): ``dp_replicate``, ``dp_shard``,
``sp_ring``, ``sp_ulysses``, ``tp``; flattened: ``sp``, ``dp`` (data loading), ``dp_shard_sp``
(FSDP), ``dp_sp`` (loss averaging); with ``ep > 1`` also ``ep`` and ``dp_shard_mod_ep``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from cupola.toolkit.config import ConfigError


def _world_size_from_env() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(kw_only=True, slots=True)
class ParallelDims:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever the other degrees leave of the world size
    sp: int = 1
    tp: int = 1
    ep: int = 1
    sp_ulysses: int = -1  # -1: all of sp
    sp_zigzag: bool = True
    world_size: int = 0  # 0: from torch.distributed, else $WORLD_SIZE, else 1
    _mesh: DeviceMesh | None = field(default=None, repr=False, compare=False)
    _flat: dict[str, DeviceMesh] = field(default_factory=dict, repr=False, compare=False)
    _sp: object = field(default=None, repr=False, compare=False)

    def validate(self) -> None:
        if self.world_size == 0:
            self.world_size = _world_size_from_env()
        for name in ("dp_replicate", "sp", "tp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"ParallelDims.{name}={value!r} is not valid: must be an integer >= 1")
        if self.dp_shard == -1:
            others = self.dp_replicate * self.sp * self.tp
            if self.world_size % others:
                raise ConfigError(
                    f"ParallelDims: world size {self.world_size} is not divisible by "
                    f"dp_replicate*sp*tp = {self.dp_replicate}*{self.sp}*{self.tp} = {others}; "
                    "choose degrees whose product divides the number of processes"
                )
            self.dp_shard = self.world_size // others
        if not isinstance(self.dp_shard, int) or self.dp_shard < 1:
            raise ConfigError(
                f"ParallelDims.dp_shard={self.dp_shard!r} is not valid: must be >= 1, or -1 to fill the world size"
            )
        product = self.dp_replicate * self.dp_shard * self.sp * self.tp
        if product != self.world_size:
            raise ConfigError(
                f"ParallelDims: dp_replicate*dp_shard*sp*tp = {self.dp_replicate}*{self.dp_shard}*{self.sp}*{self.tp} "
                f"= {product}, but the world size is {self.world_size}; the product must equal the number of "
                "processes (set dp_shard=-1 to fill it)"
            )
        if self.sp_ulysses == -1:
            self.sp_ulysses = self.sp
        if not isinstance(self.sp_ulysses, int) or self.sp_ulysses < 1 or self.sp % self.sp_ulysses:
            raise ConfigError(
                f"ParallelDims.sp_ulysses={self.sp_ulysses!r} is not valid: must divide sp={self.sp} "
                "(sp = sp_ring * sp_ulysses; -1 for all Ulysses, 1 for all ring)"
            )
        if self.ep > 1:
            if self.ep % self.sp or (self.dp_shard * self.sp) % self.ep:
                raise ConfigError(
                    f"ParallelDims.ep={self.ep} is not valid: expert parallelism takes its ranks from "
                    f"dp_shard*sp = {self.dp_shard}*{self.sp}, so ep must be a multiple of sp ({self.sp}) "
                    f"and divide {self.dp_shard * self.sp}"
                )

    # Degrees people ask about.
    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard * self.sp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def sp_enabled(self) -> bool:
        return self.sp > 1

    @property
    def sp_ring(self) -> int:
        return self.sp // self.sp_ulysses

    @property
    def sp_layout(self):
        """The :class:`~cupola.toolkit.parallel.sequence.SPLayout` of the ``sp`` ranks."""
        from cupola.toolkit.parallel.sequence import SPLayout

        return SPLayout(ring=self.sp_ring, ulysses=self.sp_ulysses, zigzag=self.sp_zigzag)

    def sequence_parallel(self):
        """This rank's :class:`~cupola.toolkit.parallel.sequence.SequenceParallel` (build the mesh first)."""
        from cupola.toolkit.parallel.sequence import SequenceParallel

        if self._sp is None:
            self._sp = SequenceParallel(
                layout=self.sp_layout,
                sp_group=self.submesh("sp").get_group() if self.sp > 1 else None,
                ring_group=self.mesh["sp_ring"].get_group() if self.sp_ring > 1 else None,
                ulysses_group=self.mesh["sp_ulysses"].get_group() if self.sp_ulysses > 1 else None,
            )
        return self._sp

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    def dp_coordinate(self, rank: int) -> int:
        """The data-parallel index of a global rank, without building the mesh (layout is row-major)."""
        return rank // (self.sp * self.tp)

    def sp_coordinate(self, rank: int) -> int:
        """The sequence-parallel index of a global rank (its place in its ``sp`` group), without the mesh."""
        return (rank // self.tp) % self.sp

    @property
    def mesh(self) -> DeviceMesh:
        if self._mesh is None:
            raise RuntimeError("ParallelDims.mesh: call build_mesh(device_type) first")
        return self._mesh

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Build (once) the named mesh on the default process group (gloo on CPU, NCCL on CUDA)."""
        if self._mesh is not None:
            return self._mesh
        self.validate()
        if self.ep > 1:
            in_ep = self.ep // self.sp
            names = ("dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep", "sp_ring", "sp_ulysses", "tp")
            shape = (self.dp_replicate, self.dp_shard // in_ep, in_ep, self.sp_ring, self.sp_ulysses, self.tp)
        else:
            names = ("dp_replicate", "dp_shard", "sp_ring", "sp_ulysses", "tp")
            shape = (self.dp_replicate, self.dp_shard, self.sp_ring, self.sp_ulysses, self.tp)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
        shard = ("dp_shard_mod_ep", "dp_shard_in_ep") if self.ep > 1 else ("dp_shard",)
        # Flattened meshes are kept here: slicing them from the root mesh is deprecated.
        sp = ("sp_ring", "sp_ulysses")
        flat = {
            "sp": sp,
            "dp": ("dp_replicate", *shard),
            "dp_shard_sp": (*shard, *sp),
            "dp_sp": ("dp_replicate", *shard, *sp),
        }
        if self.ep > 1:
            flat |= {"dp_shard": shard, "ep": ("dp_shard_in_ep", *sp)}
        self._flat = {name: mesh[dims]._flatten(name) for name, dims in flat.items()}
        self._mesh = mesh
        return mesh

    def submesh(self, name: str) -> DeviceMesh:
        """The 1-D mesh of one named dimension, flattened ones included (``"dp"``, ``"dp_shard_sp"``, ...)."""
        mesh = self.mesh
        if name in self._flat:
            return self._flat[name]
        if name in (mesh.mesh_dim_names or ()):
            return mesh[name]
        raise KeyError(f"no mesh dimension {name!r}; have {[*mesh.mesh_dim_names, *self._flat]}")
