"""Several training processes with PyTorch's own engine: torch.distributed + DistributedDataParallel.

Who starts the processes: `torchrun` (it sets RANK / WORLD_SIZE / MASTER_ADDR / ...), or a submitit
job with several tasks (Hydra's submitit launcher, `tasks_per_node`), whose environment is exported
to the same variables. One process per GPU with NCCL; gloo on CPU. With one process every function
here does nothing, so single-process training is untouched.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from segkit.engine.watchdog import exit_with_launcher
from segkit.errors import ConfigError, SegkitError

log = logging.getLogger(__name__)


class DistributedError(SegkitError):
    """Another process of the job failed or stopped answering."""


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints and run files, logs to trackers and shows the progress bar."""
        return self.rank == 0


def _export_submitit_environment() -> None:
    """Inside a submitit job with several tasks, set the env:// variables torchrun would set."""
    if "WORLD_SIZE" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    import submitit  # present whenever SUBMITIT_EXECUTOR is set: submitit started this process

    if submitit.JobEnvironment().num_tasks > 1:
        # set_cuda_visible_devices=False: the device is chosen from LOCAL_RANK below, as under torchrun.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_distributed(device: torch.device, timeout_s: float) -> tuple[DistContext, torch.device]:
    """Join the job's process group when launched with several processes; return who we are and our device.

    `device` is the single-process choice (cpu or cuda); with several processes on CUDA each takes
    GPU LOCAL_RANK. `timeout_s` bounds every collective, so a process whose peer died or hangs fails
    with an error instead of waiting forever.
    """
    _export_submitit_environment()
    # First of all: a worker must not outlive its launcher (torchrun puts each worker in its own session).
    exit_with_launcher(f"rank {os.environ.get('RANK', '0')}",
                       "the checkpoints written so far are intact; restart with trainer.resume=auto")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistContext(), device
    ctx = DistContext(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s)
        )
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one copy of the log: rank 0's
    log.info("distributed: %d processes (%s), global batch = trainer.batch_size x %d",
             world_size, dist.get_backend(), world_size)
    return ctx, device


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, ctx: DistContext, device: torch.device,
               sync_batchnorm: bool) -> torch.nn.Module:
    """DistributedDataParallel around `model` (converted in place to SyncBatchNorm if asked); `model` itself
    when single-process. Parameters and buffers are broadcast from rank 0, so every process starts equal."""
    if not ctx.enabled:
        return model
    if sync_batchnorm:
        if device.type != "cuda":
            raise ConfigError("trainer.sync_batchnorm", "SyncBatchNorm needs CUDA devices; set it to false on CPU")
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def grad_sync(module: torch.nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on accumulation steps (`no_sync`); only the last batch of a step syncs."""
    if sync or not isinstance(module, DistributedDataParallel):
        return nullcontext()
    return module.no_sync()


def global_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum over processes (a copy: running accumulators stay per process)."""
    if not ctx.enabled:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total


def global_mean(total: torch.Tensor, count: torch.Tensor, ctx: DistContext) -> float:
    """`total / count` summed over processes (a host sync: logging points only); 0 counted is 1."""
    totals = global_sum(torch.stack([total, count.to(total.dtype)]), ctx)
    return float(totals[0] / totals[1].clamp_min(1))


def global_max(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if not ctx.enabled:
        return tensor
    worst = tensor.clone()
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst


def broadcast_from_main(value: Any, ctx: DistContext) -> Any:
    """Rank 0's value on every process (e.g. the run directory, which each process's Hydra dates itself)."""
    if not ctx.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any, ctx: DistContext) -> list[Any]:
    """Every process's `value`, in rank order, on every process."""
    if not ctx.enabled:
        return [value]
    values: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    return values


@contextmanager
def peer_failures_as_errors(ctx: DistContext) -> Iterator[None]:
    """A collective that fails because another process died or timed out becomes one clear error line."""
    try:
        yield
    except RuntimeError as error:
        # NCCL failures are DistError; gloo's (a peer's socket closed, a timeout) plain RuntimeErrors from gloo.
        if not ctx.enabled or not (isinstance(error, dist.DistError) or "gloo" in str(error)):
            raise
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DistributedError(
            f"rank {ctx.rank}: lost contact with the other processes ({first_line}); "
            "resume the job with trainer.resume=auto"
        ) from None
