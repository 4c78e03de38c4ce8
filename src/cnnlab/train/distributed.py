"""Data-parallel training across processes: torch.distributed with DistributedDataParallel, launched by torchrun.

torchrun starts one process per device and tells each its place through environment variables (RANK,
WORLD_SIZE, LOCAL_RANK, TORCHELASTIC_RESTART_COUNT). Every process loads the data and builds the same
model from the same seed, and draws the same data order and augmentation from the same generator. Each
step the global batch is cut into one contiguous shard per process and DDP averages the gradients, so N
processes take the same steps as one process given the whole batch: the run's results, its checkpoints
and the state of its generators do not depend on how many processes trained it.

`Ranks` is this process's place in the job; with one process every collective is the identity, so the
trainer calls them unconditionally.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cnnlab.data.loader import shard
from cnnlab.errors import CnnlabError, ConfigError
from cnnlab.run_dir import RunDir

T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class Ranks:
    device: torch.device  # where this process trains
    rank: int = 0
    world_size: int = 1
    grouped: bool = False  # in a torch.distributed process group (under torchrun, even as its only process)

    @property
    def is_main(self) -> bool:
        """The process that prints, writes files and decides for the others."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.grouped

    def shard(self, count: int) -> slice:
        """This process's contiguous part of `count` items."""
        return shard(count, self.rank, self.world_size)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `tensor` over all processes (in place)."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every process when `flag` is true on any of them."""
        if not self.distributed:  # asked every step: one process skips the device round trip
            return flag
        return bool(self.sum(torch.tensor([int(flag)], device=self.device)).item())

    def gather_rows(self, rows: torch.Tensor, total: int) -> torch.Tensor:
        """Concatenate every process's `rows` (its `shard(total)` of a (total, ...) result) in rank order."""
        if not self.distributed:
            return rows
        longest = -(-total // self.world_size)
        padded = torch.zeros((longest, *rows.shape[1:]), dtype=rows.dtype, device=self.device)
        padded[: len(rows)] = rows
        pieces = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(pieces, padded)
        parts = [shard(total, rank, self.world_size) for rank in range(self.world_size)]
        return torch.cat([piece[: part.stop - part.start] for piece, part in zip(pieces, parts, strict=True)]).to(
            rows.device
        )

    def from_main(self, function: Callable[[], T]) -> T:
        """Run `function` on the main process only and hand its result (or its CnnlabError) to every process:
        for decisions that read or write the main process's files, which other nodes may not see."""
        if not self.distributed:
            return function()
        outcome: list[Any] = [None]
        if self.is_main:
            try:
                outcome[0] = ("value", function())
            except CnnlabError as error:
                outcome[0] = ("error", str(error))
        dist.broadcast_object_list(outcome, src=0, device=self.device)
        kind, value = outcome[0]
        if kind == "error":
            raise CnnlabError(value)
        result: T = value
        return result

    def copy_buffers_from_main(self, model: nn.Module) -> None:
        """Give every process the main process's BatchNorm statistics (each updated its own on its shard)."""
        if self.distributed:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train through: DDP over `model` (which stays the one to save and evaluate).

        DDP registers the parameters that require gradients when it is built, so the trainer wraps anew
        whenever that set changes (the fast family's whitening bias freezes after some epochs)."""
        if not self.distributed:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


def restarted_by_torchrun() -> bool:
    """True in a process that torchrun started again after a failure (`--max-restarts`)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def _init_process_group(backend: str) -> None:
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend)
        return
    # torchrun's store outlives a restart, and with it the addresses the replaced processes published:
    # read under the same keys, they send a restarted job to connect to dead ports. A prefix per
    # attempt gives each start its own keys.
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(address, port, is_master=False)  # type: ignore[attr-defined]
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"cnnlab/attempt-{attempt}", store),  # type: ignore[attr-defined]
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )


def check_restartable(out: str | None) -> None:
    """A job that torchrun may restart needs a fixed run folder for the restarted processes to resume."""
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and not out:
        raise ConfigError(
            "torchrun --max-restarts needs an output folder, out: a restarted process resumes the run there", "out"
        )


@contextlib.contextmanager
def joined(device: torch.device) -> Iterator[Ranks]:
    """This process's `Ranks`, with the process group set up for the job torchrun launched it into (gloo on
    CPU, nccl on CUDA) and torn down at the end; one process outside torchrun gets the trivial `Ranks`.
    torchrun with a single process still gets a group and DDP: the path that several processes take."""
    if "LOCAL_RANK" not in os.environ:  # torchrun sets it in every process it starts
        yield Ranks(device)
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        _init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Ranks(device, dist.get_rank(), dist.get_world_size(), grouped=True)
        # Leave together: a process that tore its group down while the main one still wrote the model
        # was seen aborting at exit ("terminate called without an active exception") now and then.
        if owned:
            dist.barrier()
    finally:
        if owned:
            dist.destroy_process_group()


def with_sync_bn(model: M, enabled: bool, ranks: Ranks) -> M:
    """BatchNorm layers that normalise over the global batch instead of each process's shard."""
    if enabled and ranks.distributed and ranks.device.type != "cuda":
        raise ConfigError("train.sync_bn needs CUDA: torch's SyncBatchNorm has no CPU implementation", "train.sync_bn")
    if not (enabled and ranks.distributed):
        return model
    synced: M = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[no-untyped-call]  # the same module
    return synced


def launch(worker_args: list[str], nproc: int, max_restarts: int, run_dir: str) -> None:
    """Run `python -m cnnlab WORKER_ARGS...` in `nproc` processes on this machine, as
    `torchrun --standalone --nproc-per-node=NPROC --max-restarts=MAX_RESTARTS -m cnnlab ...` would."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    options = ["--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}"]
    try:
        run(get_args_parser().parse_args([*options, "-m", "cnnlab", *worker_args]))  # type: ignore[no-untyped-call]
    except SignalException as stopped:  # Ctrl-C or SIGTERM: torchrun passed SIGTERM on, and each process saved
        error = CnnlabError(f"stopped by {signal.Signals(stopped.sigval).name}; checkpoint saved in {run_dir}")
        error.exit_code = 128 + stopped.sigval
        raise error.resumable(Path(run_dir), nproc) from None
    except ChildFailedError as failure:
        # The cause is the earliest failure, preferring one that torchrun's own SIGTERM did not end.
        rank, first = min(
            failure.failures.items(), key=lambda item: (item[1].timestamp, item[1].exitcode == -signal.SIGTERM)
        )
        # Said here as well as by the surviving processes: torchrun's SIGTERM may end them before they print.
        intact = RunDir(Path(run_dir)).has_checkpoint
        error = CnnlabError(
            f"{len(failure.failures)} of {nproc} processes failed (first rank {rank}, exit code {first.exitcode}"
            f"{f' after {max_restarts} restarts' if max_restarts else ''}); see their messages above"
            + (f"; the last checkpoint in {run_dir} is intact" if intact else "")
        )
        error.exit_code = first.exitcode if first.exitcode > 0 else 1
        raise (error.resumable(Path(run_dir), nproc) if intact else error) from None


def lost_contact(error: BaseException, ranks: Ranks) -> bool:
    """Whether `error` is a collective failing because another process died or was stopped: nccl raises
    DistError, gloo a plain RuntimeError from its transport (a closed or reset connection)."""
    if not ranks.distributed:
        return False
    return isinstance(error, dist.DistError) or (
        type(error) is RuntimeError and any(mark in str(error) for mark in ("gloo", "Connection"))
    )
