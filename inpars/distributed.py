"""Training on every device a pod was given: one process per GPU (DDP), one process for all TPU chips (SPMD).

* **GPUs** — data-parallel DDP, one process per GPU. :func:`run_training` spawns them itself (with
  the same ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_*`` variables ``torchrun`` sets),
  or, started under ``torchrun --nproc-per-node=N``, finds them set and runs its own rank. Every rank
  walks the *same global batch sequence* and takes a contiguous share of each batch
  (:func:`share`); each rank's loss is scaled so that DDP's gradient average equals the gradient of
  the global batch mean (:func:`loss_scale`), also when a batch does not split evenly. Rank 0 saves.
* **TPU** — PyTorch/XLA SPMD (``torch_xla.runtime.use_spmd``): one process drives every chip of the
  host, the batch dimension of each input is sharded over a 1-D ``data`` mesh, and the XLA compiler
  inserts the gradient all-reduce. torch_xla's own examples recommend SPMD over one process per chip
  (``xmp.spawn``) for data parallelism; it also keeps one training loop, one checkpoint writer and one
  SIGTERM handler, exactly as on one device. See docs/DESIGN.md.
* **CPU** — one process, unless asked for more (``processes=N``: DDP over gloo, which is how the
  multi-process path is tested without a GPU).

Everything here imports without CUDA or torch_xla; the accelerator libraries load only when used.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import socket
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, InParsError, InputError, Preempted, TransientError

# Environment torchrun sets for each worker process (and run_training sets for those it spawns).
ENV_RANK, ENV_WORLD_SIZE, ENV_LOCAL_RANK = "RANK", "WORLD_SIZE", "LOCAL_RANK"


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """How a training run uses its devices: ``single`` (one process, one device), ``ddp`` (one process
    per device, ``processes`` of them, over ``backend``) or ``spmd`` (one process, ``devices`` TPU chips)."""

    mode: str
    processes: int = 1
    devices: int = 1
    backend: str | None = None

    def describe(self) -> str:
        if self.mode == "ddp":
            return f"DDP over {self.processes} processes ({self.backend})"
        if self.mode == "spmd":
            return f"XLA SPMD over {self.devices} chips"
        return "one process, one device"


def launch_plan(device: torch.device, n_devices: int, processes: int | None = None) -> LaunchPlan:
    """The plan for ``n_devices`` devices of ``device``'s kind; ``processes`` forces a process count
    (CPU: DDP over gloo; mostly for tests). Already inside a torchrun/DDP world, that world is the plan."""
    world = world_from_env()
    if world is not None:
        return LaunchPlan("ddp", world[1], world[1], "nccl" if device.type == "cuda" else "gloo")
    if device.type == "xla":
        if processes not in (None, 1):
            raise ConfigError("on TPU, training is one process over every chip (SPMD); processes must be 1")
        return LaunchPlan("spmd", 1, max(n_devices, 1)) if n_devices > 1 else LaunchPlan("single")
    if device.type == "cuda":
        n = processes if processes is not None else n_devices
        if n > n_devices:
            raise ConfigError(f"{n} training processes asked for, but torch sees {n_devices} GPU(s)")
        return LaunchPlan("ddp", n, n, "nccl") if n > 1 else LaunchPlan("single")
    n = processes or 1
    if n > 1 and device.type != "cpu":
        raise ConfigError(f"multi-process training is for CUDA GPUs (NCCL) and CPUs (gloo), not {device.type}")
    return LaunchPlan("ddp", n, n, "gloo") if n > 1 else LaunchPlan("single")


def world_from_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun (or spawned by :func:`run_training`)."""
    size = os.environ.get(ENV_WORLD_SIZE)
    if size is None or int(size) <= 1:
        return None
    return int(os.environ[ENV_RANK]), int(size), int(os.environ.get(ENV_LOCAL_RANK, os.environ[ENV_RANK]))


# ----------------------------------------------------------------------------- inside a DDP world


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size``; rank 0 saves. ``size == 1``: no process group."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def share(batch: Sequence, world: World) -> list:
    """This rank's contiguous share of a global batch (sizes differ by at most one; may be empty)."""
    n = len(batch)
    return list(batch[world.rank * n // world.size : (world.rank + 1) * n // world.size])


def loss_scale(world: World, global_units: int) -> float:
    """Multiply a rank's *summed* loss by this: DDP averages gradients over ranks, so the result is
    the gradient of (sum over the global batch) / global_units, whatever the split."""
    return world.size / global_units


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank if ``flag`` is True on any (e.g. a stop request), so all stop at one step."""
    if world.size == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_rows(x: torch.Tensor, world: World) -> tuple[torch.Tensor, int]:
    """Every rank's rows of ``x`` concatenated in rank order (gradients flow back to each rank's own
    rows), and the offset of this rank's rows. Ranks may hold different row counts."""
    if world.size == 1:
        return x, 0
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn

    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world.size)]
    dist.all_gather(counts, count, group=_gather_group)
    sizes = [int(c.item()) for c in counts]
    padded = torch.nn.functional.pad(x, (0, 0, 0, max(sizes) - x.shape[0]))
    parts = dist_fn.all_gather(padded, group=_gather_group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sum(sizes[: world.rank])


def gather_objects(obj: Any, world: World) -> list:
    """``obj`` from every rank, in rank order."""
    if world.size == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * world.size
    dist.all_gather_object(out, obj, group=_gather_group)
    return out


# ----------------------------------------------------------------------------- TPU (SPMD)


def enable_spmd() -> None:
    """Switch torch_xla to SPMD; must run before any tensor is placed on the XLA device."""
    import torch_xla.runtime as xr  # type: ignore[import-not-found]

    xr.use_spmd()


def batch_sharder(plan: LaunchPlan) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None:
    """For SPMD: a function that shards each input's batch dimension over the chips (inputs whose
    batch does not divide evenly stay replicated: correct, only that batch runs unsplit)."""
    if plan.mode != "spmd":
        return None
    import numpy as np
    import torch_xla.distributed.spmd as xs  # type: ignore[import-not-found]

    mesh = xs.Mesh(np.arange(plan.devices), (plan.devices,), ("data",))

    def shard(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for t in inputs.values():
            if t.dim() >= 1 and t.shape[0] % plan.devices == 0:
                xs.mark_sharding(t, mesh, ("data",) + (None,) * (t.dim() - 1))
        return inputs

    return shard


def xla_step() -> None:
    """Cut and run the lazily traced XLA graph of one training step."""
    import torch_xla  # type: ignore[import-not-found]

    torch_xla.sync()


# ----------------------------------------------------------------------------- spawning


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_gather_group = None  # a second group for gathers inside the forward/backward (see init_process_group)


def init_process_group(backend: str) -> World:
    """Join the process group torchrun (or :func:`run_training`) described in the environment.

    Gathers made inside the model's forward (the bi-encoder's in-batch negatives) and their
    backward run on a group of their own: DDP's gradient all-reduces start whenever a bucket is
    ready, so on one shared group the two kinds of collectives could interleave differently on two
    ranks and deadlock. Each group on its own sees the same sequence on every rank.
    """
    import torch.distributed as dist

    global _gather_group
    rank, size, local_rank = world_from_env() or (0, 1, 0)
    if size > 1 and not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, rank=rank, world_size=size)
        _gather_group = dist.new_group(backend=backend)
    return World(rank, size)


def local_device(device: torch.device) -> torch.device:
    """This process's device in a DDP world (``cuda:LOCAL_RANK``), else ``device``."""
    world = world_from_env()
    if world is not None and device.type == "cuda":
        return torch.device("cuda", world[2])
    return device


def _spawned(index: int, fn: Callable, args: tuple, plan: LaunchPlan, port: int, result_dir: str) -> None:
    os.environ.update(
        {
            ENV_RANK: str(index),
            ENV_LOCAL_RANK: str(index),
            ENV_WORLD_SIZE: str(plan.processes),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    from . import preemption

    preemption.install()  # the parent forwards SIGTERM; a process-group kill reaches us directly too
    try:
        outcome = ("ok", fn(*args))
    except (InParsError, TransientError) as e:
        outcome = (type(e).__name__, str(e))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    Path(result_dir, f"rank-{index}.pkl").write_bytes(pickle.dumps(outcome))


_REBUILD = {"Preempted": Preempted, "ConfigError": ConfigError, "InputError": InputError, "TransientError": TransientError}


def run_training(fn: Callable[..., Any], args: tuple, plan: LaunchPlan) -> Any:
    """``fn(*args)`` in this process, or in ``plan.processes`` spawned processes (DDP) joined here.

    Returns rank 0's result. A SIGTERM to this process is forwarded to the ranks, which agree on a
    step to stop at, save, and end with :class:`Preempted`, re-raised here; a permanent error in a
    rank is re-raised here as the same type; a rank that dies is a :class:`TransientError`.
    """
    if plan.mode != "ddp" or world_from_env() is not None:
        return fn(*args)
    import torch.multiprocessing as mp

    from . import preemption

    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="inpars-ddp-") as result_dir:
        ctx = mp.start_processes(_spawned, args=(fn, args, plan, port, result_dir), nprocs=plan.processes, join=False, start_method="spawn")
        forwarded = False
        with preemption.stoppable():
            while True:
                if preemption.requested() and not forwarded:
                    for p in ctx.processes:
                        if p.pid and p.is_alive():
                            os.kill(p.pid, signal.SIGTERM)
                    forwarded = True
                try:
                    if ctx.join(timeout=1.0):
                        break
                except mp.ProcessExitedException as e:
                    raise TransientError(f"a training process died ({e})") from None
                except mp.ProcessRaisedException as e:
                    raise TransientError(f"a training process failed: {e}") from None
        outcomes = [pickle.loads(Path(result_dir, f"rank-{i}.pkl").read_bytes()) for i in range(plan.processes)]
    for kind, value in outcomes:
        if kind != "ok":
            raise _REBUILD.get(kind, TransientError)(value)
    return outcomes[0][1]
