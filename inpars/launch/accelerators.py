"""GKE accelerators a stage can ask for: GPU types, and TPU generations with their slice shapes.

A TPU slice is named by its GKE accelerator (``cloud.google.com/gke-tpu-accelerator``) and its
topology (``cloud.google.com/gke-tpu-topology``). Whether a slice fits on one host decides how it is
run: a single-host slice is one pod asking for all of its chips; a multi-host slice is one pod per
host, each asking for the host's chips, started together (a JobSet). GKE's node pools for
multi-host slices use 4-chip VMs for every generation listed here (v5e/v6e ``*-4t``, v4/v5p
``ct4p/ct5p-hightpu-4t``); v5e and v6e also have 1-, 4- and 8-chip single-host machines, so their
1x1, 2x2 and 2x4 slices are one host (a 2x4 pod asks for 8 chips, which only an 8-chip VM has).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError

GPU_RESOURCE = "nvidia.com/gpu"
TPU_RESOURCE = "google.com/tpu"
GPU_NODE_LABEL = "cloud.google.com/gke-accelerator"
TPU_ACCELERATOR_LABEL = "cloud.google.com/gke-tpu-accelerator"
TPU_TOPOLOGY_LABEL = "cloud.google.com/gke-tpu-topology"

# GKE GPU names (the node label value) -> the most GPUs one node of that type has. A pod asking for
# more never schedules. (In this order in k8s/kueue/: Kueue tries a GPU pod without a type on the first.)
GPU_TYPES: dict[str, int] = {
    "nvidia-l4": 8,
    "nvidia-tesla-t4": 4,
    "nvidia-tesla-v100": 8,
    "nvidia-tesla-a100": 16,
    "nvidia-a100-80gb": 8,
    "nvidia-h100-80gb": 8,
    "nvidia-h100-mega-80gb": 8,
    "nvidia-h200-141gb": 8,
    "nvidia-b200": 8,
}


@dataclass(frozen=True)
class TpuGeneration:
    """One TPU generation as GKE names it."""

    name: str  # v5e, v6e, v5p, v4
    accelerator: str  # the cloud.google.com/gke-tpu-accelerator value
    dims: int  # 2 (v5e, v6e) or 3 (v4, v5p) topology dimensions
    chips_per_host: int  # chips on each host of a multi-host slice
    single_host: frozenset[str]  # topologies that one host serves, all chips in one pod
    topologies: frozenset[str] | None = None  # the slice shapes there are (None: the v4/v5p rule in tpu_slice)


_V5E_V6E_SHAPES = frozenset({"1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"})

TPU_GENERATIONS: dict[str, TpuGeneration] = {
    g.accelerator: g
    for g in (
        TpuGeneration("v5e", "tpu-v5-lite-podslice", 2, 4, frozenset({"1x1", "2x2", "2x4"}), _V5E_V6E_SHAPES),
        TpuGeneration("v6e", "tpu-v6e-slice", 2, 4, frozenset({"1x1", "2x2", "2x4"}), _V5E_V6E_SHAPES),
        TpuGeneration("v5p", "tpu-v5p-slice", 3, 4, frozenset({"2x2x1"})),
        TpuGeneration("v4", "tpu-v4-podslice", 3, 4, frozenset({"2x2x1"})),
    )
}


@dataclass(frozen=True)
class TpuSlice:
    """A requested slice: how many chips, on how many hosts, and so how many chips each pod asks for."""

    generation: TpuGeneration
    topology: str
    chips: int
    hosts: int

    @property
    def chips_per_pod(self) -> int:
        return self.chips // self.hosts

    @property
    def multi_host(self) -> bool:
        return self.hosts > 1


def tpu_slice(tpu_type: str, topology: str | None, where: str = "resources") -> TpuSlice:
    """The slice ``tpu_type`` x ``topology`` names, or a :class:`ConfigError` saying what is wrong."""
    generation = TPU_GENERATIONS.get(tpu_type)
    if generation is None:
        raise ConfigError(f"{where}: unknown tpu_type {tpu_type!r}; GKE's TPU accelerators: {', '.join(TPU_GENERATIONS)}")
    if not topology:
        raise ConfigError(f"{where}: tpu_type needs tpu_topology (e.g. {sorted(generation.single_host)[0]})")
    parts = topology.lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"{where}: bad tpu_topology {topology!r} (e.g. 2x2 or 2x2x1)") from None
    if len(dims) != generation.dims or min(dims) < 1:
        raise ConfigError(f"{where}: tpu_topology {topology!r} must have {generation.dims} dimensions for {generation.name} ({tpu_type})")
    chips = math.prod(dims)
    if topology in generation.single_host:
        return TpuSlice(generation, topology, chips, 1)
    known = generation.topologies
    # v4/v5p multi-host shapes (GKE): every dimension 2 or a multiple of 4, e.g. 2x2x2, 2x4x4, 4x4x8.
    valid_shape = all(d == 2 or d % 4 == 0 for d in dims) if known is None else topology in known
    if not valid_shape or chips % generation.chips_per_host or chips <= generation.chips_per_host:
        shapes = sorted(known or generation.single_host, key=lambda t: math.prod(int(x) for x in t.split("x")))
        raise ConfigError(
            f"{where}: {generation.name} ({tpu_type}) has no slice {topology!r}; e.g. {', '.join(shapes)}"
            + ("" if known else ", or a multi-host shape whose dimensions are 2 or multiples of 4 (2x2x2, 2x2x4, 2x4x4, 4x4x4, ...)")
        )
    return TpuSlice(generation, topology, chips, chips // generation.chips_per_host)


def check_gpus(gpu: int, gpu_type: str | None, where: str = "resources") -> None:
    """A GPU request a GKE node can hold: a known type, and no more GPUs than its largest node has."""
    if gpu < 0:
        raise ConfigError(f"{where}: gpu must be >= 0, got {gpu}")
    if gpu_type is None:
        return
    most = GPU_TYPES.get(gpu_type)
    if most is None:
        raise ConfigError(f"{where}: unknown gpu_type {gpu_type!r}; GKE's GPU types: {', '.join(GPU_TYPES)}")
    if gpu > most:
        raise ConfigError(f"{where}: gpu={gpu}, but a {gpu_type} node has at most {most}: the pod would never schedule")
