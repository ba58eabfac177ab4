"""Several processes running one recipe (``torchrun``): who writes, and agreeing on failures.

Under ``torchrun --nproc_per_node N -m slimline.cli run recipe.yaml`` every rank computes every
stage (``slimline.training.fit`` shards each batch across ranks), but only rank 0 touches the run
directory. After each step the ranks exchange a one-number status on a separate gloo group; if
any rank failed, every rank raises, naming the failing rank and its message, instead of the
healthy ranks waiting forever for a peer that is gone.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from slimline.stage import StageFailed

T = TypeVar("T")

# How long a healthy rank waits for its peers at a status exchange (their work is the same, so
# a long wait means a peer is stuck); and how long a failed rank waits for its peers to report
# before giving up (peers blocked inside a training collective never will; once this process
# exits, gloo fails their collective and the launcher stops them).
WAIT_SECONDS = float(os.environ.get("SLIMLINE_DIST_TIMEOUT", "1800"))
FAILED_WAIT_SECONDS = float(os.environ.get("SLIMLINE_DIST_FAILED_WAIT", "60"))


class PeerFailed(StageFailed):
    """Another rank failed; this rank stops too."""


@dataclass
class RankGroup:
    """This process's place in the run: ``rank`` 0 of ``size`` 1 when not distributed."""

    rank: int = 0
    size: int = 1
    control: Any = None  # gloo process group for status exchanges (None when size == 1)

    @property
    def is_writer(self) -> bool:
        """Only this rank writes the run directory, logs progress and takes the lock."""
        return self.rank == 0

    def agree(self, what: str, error: BaseException | None) -> None:
        """Every rank reports whether ``what`` succeeded here; raise on all ranks if any failed.

        The failing rank re-raises its own exception (type and message unchanged); the others
        raise :class:`PeerFailed` with the failing rank's message.
        """
        if self.size == 1:
            if error is not None:
                raise error
            return
        flags = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        mine = torch.tensor([int(error is not None)], dtype=torch.int64)
        wait = FAILED_WAIT_SECONDS if error is not None else WAIT_SECONDS
        reports: list[tuple[str, bool] | None] = [None] * self.size  # (message, lost a peer)
        lost = ""
        try:
            dist.all_gather(flags, mine, group=self.control, async_op=True).wait(
                timeout=timedelta(seconds=wait))
            if any(int(flag) for flag in flags):
                dist.all_gather_object(
                    reports, None if error is None
                    else (_describe(error), _is_communication_error(error)), group=self.control)
        except RuntimeError as exc:  # a peer timed out or its process is gone
            lost = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if error is not None and not _is_communication_error(error):
            raise error  # our own failure is the cause; peers hear of it here or from our exit
        # A rank whose collective broke only because a peer vanished is not the cause: name the
        # rank that failed on its own if it managed to report.
        causes = [rank for rank, report in enumerate(reports) if report and not report[1]]
        if causes:
            raise PeerFailed(f"rank {causes[0]} of {self.size} failed during {what}: "
                             f"{reports[causes[0]][0]}") from error
        if lost or error is not None:
            raise PeerFailed(f"rank {self.rank}: lost contact with the other ranks during {what} "
                             f"({lost or _describe(error)}); another rank probably failed or was "
                             "killed, and its log has the cause") from error

    def attempt(self, what: str, work: Callable[[], T], *, writer_only: bool = False) -> T | None:
        """Run ``work`` (on rank 0 only if ``writer_only``), then :meth:`agree` on the outcome."""
        error: BaseException | None = None
        value: T | None = None
        if self.is_writer or not writer_only:
            try:
                value = work()
            except Exception as exc:  # noqa: BLE001 (handed to every rank by agree)
                error = exc
        self.agree(what, error)
        return value

    def share(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (picklable objects)."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]


def _is_communication_error(error: BaseException) -> bool:
    """A collective failed because a peer went away (gloo/NCCL say so in their messages), as
    opposed to this rank's own computation failing. The stage wrapper may have re-raised it."""
    chain: BaseException | None = error
    while chain is not None:
        text = str(chain)
        if isinstance(chain, getattr(dist, "DistError", ())) or any(
                marker in text for marker in ("Connection closed by peer", "Connection reset",
                                              "Broken pipe", "gloo/transport", "NCCL error")):
            return True
        chain = chain.__cause__ or chain.__context__
    return False


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    if isinstance(error, StageFailed | OSError) or not text:
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}"


def backend() -> str:
    """gloo for CPU tensors (slimline trains on CPU); NCCL added for CUDA tensors if present."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


@contextlib.contextmanager
def rank_group() -> Iterator[RankGroup]:
    """The process group of this run: joined from ``torchrun``'s environment variables
    (``WORLD_SIZE`` > 1), reused if the caller already initialised one, else a single rank.
    A group created here is destroyed on exit."""
    created = False
    if not (dist.is_available() and dist.is_initialized()):
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
            yield RankGroup()
            return
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} "
                               "is not set; launch with torchrun, or unset WORLD_SIZE")
        dist.init_process_group(backend(), timeout=timedelta(seconds=WAIT_SECONDS))
        created = True
    try:
        if dist.get_world_size() == 1:
            yield RankGroup()
            return
        control = dist.new_group(backend="gloo", timeout=timedelta(seconds=WAIT_SECONDS))
        yield RankGroup(dist.get_rank(), dist.get_world_size(), control)
    finally:
        if created:
            dist.destroy_process_group()
