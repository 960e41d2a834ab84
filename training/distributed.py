"""Data-parallel training under ``torchrun`` (torch.distributed); a single process needs none of it.

``fpt-deploy train`` runs unchanged under ``torchrun --nproc-per-node N -m fpt_deploy.cli train ...``:
the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``)
is read here, and without it nothing distributed happens at all.

How the work is split, chosen so that N ranks compute exactly what one process computes:

- ``--batch-size`` is the GLOBAL batch. Every rank draws the same global batch of each step (the
  batches are a function of (seed, epoch) only) and keeps a strided share, ``batch[rank::world]``:
  DistributedSampler's sharding, applied per step so the batches are the single-process ones.
- Each rank's loss is its local mean scaled by ``local / global * world``; DistributedDataParallel
  averages gradients over ranks, so the result is the gradient of the global-batch mean, also when the
  batch does not divide evenly. A tail batch smaller than the world leaves some ranks a zero-weight
  sample, so every rank still joins the collective.
- DDP all-reduces only parameters with ``requires_grad``: the FPT's heads, positions and norms. The
  frozen body (and every buffer) is excluded from DDP's broadcasts too; each rank loads the same body,
  and the ranks' body fingerprints are compared once at start.
- Held-out evaluation is sharded the same way and its sums all-reduced, so every rank takes the same
  "best" and early-stop decisions. Logging, the progress bar and checkpoints come from rank 0 only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fpt_deploy.errors import ConfigError, FptDeployError, collect

log = logging.getLogger(__name__)

BACKENDS = ("auto", "nccl", "gloo")
TIMEOUT = timedelta(minutes=10)  # how long a collective (and the rendezvous) waits for a missing rank
_QUIET_ON_OTHER_RANKS = ("training", "fpt_deploy")  # loggers silenced below WARNING on ranks > 0


class LaunchError(ConfigError):
    """The launcher's environment is inconsistent, or the ranks cannot meet or do not agree."""


class RanksDisagreeError(LaunchError):
    """Raised on EVERY rank at the same point, so the ranks can still leave the process group together."""


@dataclass(frozen=True)
class World:
    """Where this process stands: rank 0 of 1, with no process group, when no launcher started it."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group
    owns_group: bool = False  # this module created the process group, so it destroys it

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` -> a device; under a launcher, GPU ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cuda":
        return torch.device(name)
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is visible; use --device cpu or auto")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise LaunchError(
            f"LOCAL_RANK={local_rank} needs GPU {local_rank}, but only {count} GPU(s) are visible; "
            f"launch at most {count} processes per node (torchrun --nproc-per-node {count})"
        )
    return torch.device("cuda", local_rank)


def read_launcher_env(environ: Mapping[str, str] = os.environ) -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` set by torchrun (or any env:// launcher); None without one.

    ``WORLD_SIZE=1`` without a rendezvous address is a plain single process.
    """
    if "WORLD_SIZE" not in environ and "RANK" not in environ:
        return None
    problems, values = [], {}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        raw = environ.get(key)
        if raw is None:
            continue
        try:
            values[key] = int(raw)
        except ValueError:
            problems.append(f"{key}={raw!r} is not an integer")
    if "WORLD_SIZE" not in environ:
        problems.append("RANK is set but WORLD_SIZE is not; launch with torchrun, which sets both")
    collect(problems, LaunchError)
    world_size = values["WORLD_SIZE"]
    rank = values.get("RANK", 0)
    local_rank = values.get("LOCAL_RANK", rank)
    if world_size < 1:
        problems.append(f"WORLD_SIZE must be >= 1 (got {world_size})")
    elif not 0 <= rank < world_size:
        problems.append(f"RANK must be in 0..{world_size - 1} for WORLD_SIZE={world_size} (got {rank})")
    if local_rank < 0:
        problems.append(f"LOCAL_RANK must be >= 0 (got {local_rank})")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
    if world_size > 1 and missing:
        problems.append(
            f"WORLD_SIZE={world_size} but no rendezvous ({' and '.join(missing)} unset): the ranks cannot find "
            "each other; launch with `torchrun --nproc-per-node N -m fpt_deploy.cli train ...`, which sets them, "
            "or set MASTER_ADDR and MASTER_PORT to rank 0's address and a free port"
        )
    collect(problems, LaunchError)
    if world_size == 1 and missing:
        return None
    return rank, world_size, local_rank


def _pick_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"distributed backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    if backend == "auto":
        return "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise LaunchError(
                "the NCCL backend was asked for, but no CUDA GPU is visible; "
                "use --dist-backend gloo (or auto) to train on CPUs"
            )
        if device.type != "cuda":
            raise LaunchError("the NCCL backend needs --device cuda (or auto); use --dist-backend gloo with CPUs")
        if not dist.is_nccl_available():
            raise LaunchError("this PyTorch build has no NCCL; use --dist-backend gloo")
    if backend == "gloo" and not dist.is_gloo_available():
        raise LaunchError("this PyTorch build has no gloo backend; use --dist-backend nccl on GPUs")
    return backend


def init_world(device: str = "auto", backend: str = "auto", environ: Mapping[str, str] = os.environ) -> World:
    """Join the launcher's process group when there is one (else a single-process ``World``).

    A process group that the caller already initialised is used as it is, and left open at the end.
    """
    launcher = read_launcher_env(environ)
    if launcher is None and not (dist.is_available() and dist.is_initialized()):
        if backend == "nccl":
            _pick_backend(backend, resolve_device(device))  # the same clear errors as under a launcher
        return World(device=resolve_device(device))
    if not dist.is_available():
        raise LaunchError("a launcher started this process, but this PyTorch build has no torch.distributed")
    if dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
        local_rank = launcher[2] if launcher else rank
        torch_device = resolve_device(device, local_rank)
        group_backend = str(dist.get_backend())
        return World(rank, size, local_rank, torch_device, group_backend, owns_group=False)
    rank, size, local_rank = launcher
    torch_device = resolve_device(device, local_rank)
    chosen = _pick_backend(backend, torch_device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    try:
        dist.init_process_group(chosen, init_method="env://", rank=rank, world_size=size, timeout=TIMEOUT)
    except (RuntimeError, ValueError, TimeoutError) as e:
        where = f"{environ.get('MASTER_ADDR')}:{environ.get('MASTER_PORT')}"
        raise LaunchError(
            f"rank {rank} of {size} could not join the process group at {where} with {chosen} ({e}); "
            "check that every rank was started with the same MASTER_ADDR, MASTER_PORT and "
            "WORLD_SIZE and that the port is free on rank 0"
        ) from e
    if rank != 0:
        for name in _QUIET_ON_OTHER_RANKS:
            logging.getLogger(name).setLevel(logging.WARNING)
    log.info("distributed: %d ranks, backend %s, %s per rank", size, chosen, torch_device)
    return World(rank, size, local_rank, torch_device, chosen, owns_group=True)


@contextmanager
def joined(world: World) -> Iterator[None]:
    """Mark an ``FptDeployError`` leaving a rank that joined a process group: exit without teardown.

    After a user error the ranks leave the group together, but gloo's threads can still abort the
    process during interpreter teardown (SIGABRT instead of exit code 2); the error says so.
    """
    try:
        yield
    except FptDeployError as e:
        if world.owns_group:
            e.exit_without_teardown = True
        raise


def close_world(world: World, ok: bool = True) -> None:
    """Wait for every rank (after a clean run), then leave the process group this module created."""
    if not world.distributed:
        return
    if ok:
        dist.barrier()
    if world.owns_group:
        dist.destroy_process_group()
        if world.rank != 0:
            for name in _QUIET_ON_OTHER_RANKS:
                logging.getLogger(name).setLevel(logging.NOTSET)


def shard(global_batch: torch.Tensor, world: World) -> tuple[torch.Tensor, float]:
    """This rank's share of a global batch, and the loss factor that makes DDP's average the global mean.

    The factor is ``local / global * world``; a rank left without samples (a tail batch smaller than
    the world) gets one sample with factor 0, so it still joins the gradient all-reduce.
    """
    if world.size == 1:
        return global_batch, 1.0
    local = global_batch[world.rank :: world.size]
    if len(local) == 0:
        return global_batch[:1], 0.0
    return local, len(local) * world.size / len(global_batch)


def wrap_model(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """The module to call in training: ``model`` itself, or DDP over its trainable tensors only."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # The frozen body and the buffers are identical on every rank by construction (and fingerprinted):
    # keep them out of DDP's broadcasts, which would otherwise copy the whole body from rank 0.
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def all_reduce_sums(values: list[float], world: World) -> list[float]:
    """Element-wise sums over ranks (the values themselves in a single process)."""
    if not world.distributed:
        return values
    device = world.device if world.backend == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def check_ranks_agree(what: str, value: str, world: World) -> None:
    """Raise on every rank when the ranks disagree on ``value`` (say, the body fingerprint or the config)."""
    if not world.distributed:
        return
    seen: list = [None] * world.size
    dist.all_gather_object(seen, value)
    differing = [r for r, v in enumerate(seen) if v != seen[0]]
    if differing:
        raise RanksDisagreeError(
            f"ranks {', '.join(map(str, differing))} differ from rank 0 in {what}; start every rank "
            "with the same command line and backbone"
        )
