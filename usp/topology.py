"""Topology: one named DeviceMesh over the ranks, with validated degrees and a group per axis.

The mesh axes are ``pp`` (pipeline stages, outermost: its point-to-point traffic is the lightest),
``dp`` (data parallel), ``ring`` and ``ulysses`` (the two sequence-parallel axes) and ``tp``
(tensor parallel). Every axis is always present, possibly of size 1, so code can ask for
any axis without special cases. The innermost axes hold adjacent ranks (the fast links inside a
node): ``tp`` is innermost, then ``ulysses`` ("head-first" placement, the default: the Ulysses
all-to-all stays on NVLink and the ring's P2P crosses nodes), or ``ring`` ("context-first").

The sequence shard index of a rank is ``ring_rank * ulysses_size + ulysses_rank`` whatever the
placement: the ring sees the concatenation of its Ulysses row's shards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from usp.choices import MESH_ORDERS, PLACEMENTS
from usp.comm import agree

logger = logging.getLogger(__name__)

AXES = ("pp", "dp", "ring", "ulysses", "tp")
# the axes whose ranks hold different tokens: a token mean or count sums over them
DATA_AXES = ("dp", "ring", "ulysses")


def mesh_sizes(world_size: int, ring: int = 1, ulysses: int = 1, dp: int = -1, tp: int = 1,
               pp: int = 1) -> dict[str, int]:
    """The size of each axis when ``pp x dp x ring x ulysses x tp`` ranks fill ``world_size``
    (``dp=-1``: the ranks the others leave); ValueError, naming the numbers, for degrees that
    cannot. :meth:`Topology.build` lays its mesh by it, and ``usp train`` checks its degrees by
    it before any rank starts."""
    for name, value in (("ring", ring), ("ulysses", ulysses), ("tp", tp), ("pp", pp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if not (dp == -1 or (isinstance(dp, int) and not isinstance(dp, bool) and dp >= 1)):
        raise ValueError(f"dp={dp!r} must be a positive integer or -1 (inferred)")
    inner = pp * ring * ulysses * tp
    if world_size % inner != 0:
        raise ValueError(
            f"pp={pp} x ring={ring} x ulysses={ulysses} x tp={tp} = {inner} does not divide the "
            f"{world_size} ranks; use a world size (--nproc) that is a multiple of {inner}"
        )
    if dp == -1:
        dp = world_size // inner
    if dp * inner != world_size:
        raise ValueError(
            f"pp={pp} x dp={dp} x ring={ring} x ulysses={ulysses} x tp={tp} = {dp * inner} != "
            f"{world_size} ranks; pass dp=-1 (--dp -1) to infer dp={world_size // inner}"
        )
    return {"pp": pp, "dp": dp, "ring": ring, "ulysses": ulysses, "tp": tp}


def _mesh_axis_order(placement: str) -> tuple[str, ...]:
    if placement not in MESH_ORDERS:
        raise ValueError(f"unknown placement {placement!r}; choose one of {PLACEMENTS}")
    return MESH_ORDERS[placement]


def _device_type_for_backend() -> str:
    backend = dist.get_backend()
    return "cuda" if "nccl" in str(backend) else "cpu"


@dataclass
class Topology:
    """Degrees, ranks and process groups of the named mesh axes.

    Build it with :meth:`build` (over the default process group) or :meth:`from_mesh`. A topology
    built without an initialised process group is the trivial single-process one (every size 1).
    """

    sizes: dict[str, int]
    ranks: dict[str, int]
    mesh: DeviceMesh | None = None
    placement: str = "head-first"
    _groups: dict[str, dist.ProcessGroup] = field(default_factory=dict, repr=False)
    _flat_meshes: dict[tuple[str, ...], DeviceMesh] = field(default_factory=dict, repr=False)
    _control_group: dist.ProcessGroup | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.sizes) - set(AXES))
        if unknown:
            raise ValueError(f"unknown axes {unknown}; the axes are {AXES}")
        # an axis left out has size 1 (rank 0)
        self.sizes = {axis: self.sizes.get(axis, 1) for axis in AXES}
        self.ranks = {axis: self.ranks.get(axis, 0) for axis in AXES}

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        ring: int = 1,
        ulysses: int = 1,
        dp: int = -1,
        tp: int = 1,
        pp: int = 1,
        *,
        placement: str = "head-first",
        device_type: str | None = None,
    ) -> "Topology":
        """Lay ``pp × dp × ring × ulysses × tp`` over the default process group; ``dp=-1`` infers it."""
        order = _mesh_axis_order(placement)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        sizes = mesh_sizes(world, ring=ring, ulysses=ulysses, dp=dp, tp=tp, pp=pp)
        if world == 1 and not (dist.is_available() and dist.is_initialized()):
            return cls(sizes=sizes, ranks={axis: 0 for axis in AXES}, placement=placement)
        mesh = init_device_mesh(
            device_type or _device_type_for_backend(),
            tuple(sizes[axis] for axis in order),
            mesh_dim_names=order,
        )
        return cls._from_full_mesh(mesh, placement)

    @classmethod
    def from_mesh(cls, mesh: DeviceMesh) -> "Topology":
        """Adopt an existing mesh whose dim names are a subset of ``pp, dp, ring, ulysses, tp``.

        Missing axes have size 1. The placement is read off the order of ``ring`` and ``ulysses``.
        """
        names = mesh.mesh_dim_names
        if names is None:
            raise ValueError("the DeviceMesh needs mesh_dim_names drawn from " + ", ".join(AXES))
        unknown = [n for n in names if n not in AXES]
        if unknown:
            raise ValueError(f"unknown mesh dim names {unknown}; usp understands {AXES}")
        placement = "head-first"
        if "ring" in names and "ulysses" in names and names.index("ring") > names.index("ulysses"):
            placement = "context-first"
        return cls._from_full_mesh(mesh, placement)

    @classmethod
    def _from_full_mesh(cls, mesh: DeviceMesh, placement: str) -> "Topology":
        names = mesh.mesh_dim_names
        sizes = {axis: 1 for axis in AXES}
        ranks = {axis: 0 for axis in AXES}
        groups = {}
        for axis in names:
            sizes[axis] = mesh.size(names.index(axis))
            ranks[axis] = mesh.get_local_rank(axis)
            groups[axis] = mesh.get_group(axis)
        topology = cls(sizes=sizes, ranks=ranks, mesh=mesh, placement=placement, _groups=groups)
        logger.debug("built %s", topology)
        return topology

    # ------------------------------------------------------------------ queries
    def size(self, axis: str) -> int:
        self._check_axis(axis)
        return self.sizes[axis]

    def rank(self, axis: str) -> int:
        self._check_axis(axis)
        return self.ranks[axis]

    def group(self, axis: str) -> dist.ProcessGroup:
        """The process group of one axis; an axis of size 1 outside any mesh has none."""
        self._check_axis(axis)
        if axis not in self._groups:
            raise ValueError(f"axis {axis!r} has size {self.sizes[axis]} and no process group")
        return self._groups[axis]

    def flat_mesh(self, *axes: str) -> DeviceMesh:
        """A 1-D mesh over several axes flattened together (e.g. ``dp, ring, ulysses`` for FSDP)."""
        for axis in axes:
            self._check_axis(axis)
        if self.mesh is None:
            raise ValueError("a single-process topology has no DeviceMesh to flatten")
        present = tuple(a for a in self.mesh.mesh_dim_names if a in axes)
        if len(present) == 1:
            return self.mesh[present[0]]
        if present not in self._flat_meshes:
            self._flat_meshes[present] = self.mesh[present]._flatten("_".join(present))
        return self._flat_meshes[present]

    @property
    def data_size(self) -> int:
        """How many ranks hold different tokens: dp × ring × ulysses."""
        return self.sizes["dp"] * self.sizes["ring"] * self.sizes["ulysses"]

    def sum_over_data(self, tensor):
        """``tensor`` summed in place over the ranks that hold different tokens (``DATA_AXES``;
        nothing to do when they are one); returns it."""
        if self.data_size > 1:
            dist.all_reduce(tensor, group=self.flat_mesh(*DATA_AXES).get_group())
        return tensor

    @property
    def ring_size(self) -> int:
        return self.sizes["ring"]

    @property
    def ulysses_size(self) -> int:
        return self.sizes["ulysses"]

    @property
    def ring_rank(self) -> int:
        return self.ranks["ring"]

    @property
    def ulysses_rank(self) -> int:
        return self.ranks["ulysses"]

    @property
    def ring_group(self) -> dist.ProcessGroup:
        return self.group("ring")

    @property
    def ulysses_group(self) -> dist.ProcessGroup:
        return self.group("ulysses")

    @property
    def sequence_size(self) -> int:
        """How many ranks share one sequence: ring × ulysses."""
        return self.sizes["ring"] * self.sizes["ulysses"]

    @property
    def sequence_rank(self) -> int:
        """The index of this rank's sequence shard: ``ring_rank * ulysses_size + ulysses_rank``."""
        return self.ranks["ring"] * self.sizes["ulysses"] + self.ranks["ulysses"]

    @property
    def sequence_group(self) -> dist.ProcessGroup:
        """One group over ring × ulysses, ordered by ``sequence_rank``."""
        return self.flat_mesh("ring", "ulysses").get_group()

    @property
    def sequence_index_of_group_rank(self) -> list[int]:
        """For each rank of :attr:`sequence_group` (in group order), its sequence shard index.

        Head-first placement flattens (ring, ulysses) so the two orders agree; context-first
        flattens (ulysses, ring) and they differ.
        """
        ring, ulysses = self.ring_size, self.ulysses_size
        if self.placement == "head-first":
            return list(range(ring * ulysses))
        return [(g % ring) * ulysses + g // ring for g in range(ring * ulysses)]

    @property
    def world_size(self) -> int:
        return self.sizes["pp"] * self.sizes["dp"] * self.sequence_size * self.sizes["tp"]

    def agree_on_call(self, description: dict, error: "BaseException | str | None") -> None:
        """Make the sequence group's ranks agree on one call (:func:`usp.comm.agree`): the same
        ValueError on every rank if any rank has an ``error`` (any exception its checks raised)
        or the descriptions differ.

        It runs on **every** call, before the call's first collective: ranks that agreed on a
        description before may disagree on the next call (a different ``cu_seqlens`` on one
        rank), and trusting a memory of it would send them into different collectives. The
        cost is one all-gather of two int64 per rank over :attr:`control_group`, on the host.
        """
        message = None
        if isinstance(error, ValueError):
            message = str(error)
        elif isinstance(error, BaseException):
            message = f"{type(error).__name__}: {error}"
        elif error is not None:
            message = str(error)
        try:
            agree(self.control_group if self.sequence_size > 1 else None, description, message)
        except ValueError as agreed:
            raise agreed from (error if isinstance(error, BaseException) else None)

    @property
    def control_group(self) -> dist.ProcessGroup:
        """The sequence group for agreements, on the host: the sequence group itself where its
        backend takes CPU tensors (gloo), else a gloo group over the same ranks, created once
        (so agreeing on a call never waits for the GPU's queue)."""
        group = self.sequence_group
        if "gloo" in str(dist.get_backend(group)):
            return group
        if self._control_group is None:
            self._control_group = dist.new_group(dist.get_process_group_ranks(group),
                                                 backend="gloo", use_local_synchronization=True)
        return self._control_group

    def _check_axis(self, axis: str) -> None:
        if axis not in AXES:
            raise ValueError(f"unknown axis {axis!r}; the axes are {AXES}")

    def __str__(self) -> str:
        degrees = " x ".join(f"{a}={self.sizes[a]}" for a in AXES)
        return f"Topology({degrees}, {self.placement})"
