"""Work split over the processes ``torchrun`` starts, for ``tome_fx.sweep`` and ``tome-fx sweep``.

    with session(device) as group:        # torchrun's WORLD_SIZE > 1: a process group, else one
        with group.step() as step:        # an exception on any rank stops every rank
            step.value = len(my_items)
        step.values                       # every rank's value, in rank order
        plan = group.broadcast(plan)      # rank 0's object, on every rank
        parts = group.gather(outputs)     # on rank 0 every rank's object in rank order, else None

A rank that fails must not leave the others waiting in a collective for it: an exception inside
a step is held until the step ends, where one ``all_gather`` tells every rank who failed, and
every rank raises the same one-line ``DistributedError``. A rank that is stuck or gone (killed,
a hung file system) is caught by the collectives' timeout (``session(timeout=...)``): the ranks
waiting for it raise a ``DistributedError`` saying so. In one process a step is transparent
(the exception passes unchanged) and the collectives return their argument.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch

from .errors import TomeError, one_line


TIMEOUT = 1800.0  # seconds a process waits for the others in a collective (rank 0 plans alone)


class DistributedError(TomeError, RuntimeError):
    """A process of a distributed job failed: raised on every process, naming the failed one;
    or a collective failed (a process stuck past the timeout, or gone)."""


def launched_world() -> int:
    """Processes ``torchrun`` started (its ``WORLD_SIZE``; 1 without it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def local_cuda() -> torch.device:
    """This process's GPU: its ``LOCAL_RANK`` among the visible ones (one GPU per local rank;
    a launcher that gives each process its own ``CUDA_VISIBLE_DEVICES`` leaves one, index 0)."""
    rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if count > 1 and rank >= count:
        raise ValueError(f"local rank {rank} has no GPU of its own: this machine shows {count}; "
                         f"start at most {count} processes per machine (or use --device cpu)")
    return torch.device("cuda", rank % count)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() else None


@dataclass(frozen=True)
class Group:
    """The processes of a job: this one's ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1
    timeout: float | None = None  # seconds; None: the caller's group, its own timeout

    @property
    def main(self) -> bool:
        return self.rank == 0

    def step(self) -> "Step":
        return Step(self)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        with self._collective("broadcast"):
            _dist().broadcast_object_list(box, src)
        return box[0]

    def gather(self, obj: Any, dst: int = 0) -> list | None:
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.rank == dst else None
        with self._collective("gather"):
            _dist().gather_object(obj, out, dst)
        return out

    @contextmanager
    def _collective(self, name: str):
        """A collective's failure (gloo's timeout, a peer's closed connection: RuntimeError)
        as one line saying what it likely means."""
        try:
            yield
        except RuntimeError as exc:
            if isinstance(exc, DistributedError):
                raise
            limit = "its timeout" if self.timeout is None else f"{self.timeout:g} s"
            raise DistributedError(
                f"rank {self.rank} of {self.world}: a {name} with the other processes failed "
                f"(one stopped, or kept the others waiting longer than {limit}): "
                f"{one_line(exc)}") from exc

    def share(self, parts: int) -> range:
        """This rank's run of ``parts``: contiguous, in rank order, the first ranks one more
        where they do not divide evenly."""
        size, extra = divmod(parts, self.world)
        start = self.rank * size + min(self.rank, extra)
        return range(start, start + size + (self.rank < extra))


class Step:
    """A stretch of work after which every rank knows whether any rank failed (``Group.step``)."""

    def __init__(self, group: Group):
        self.group, self.value, self.values = group, None, None

    def __enter__(self) -> "Step":
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        world = self.group.world
        if world == 1 or (exc is not None and not isinstance(exc, Exception)):
            self.values = [self.value]  # one process, or an interrupt: torchrun stops the others
            return False
        if isinstance(exc, DistributedError):  # every rank raised it together: passed on
            return False
        mine = None if exc is None else f"{type(exc).__name__}: {one_line(exc)}"
        sent: list = [None] * world
        with self.group._collective("step"):
            _dist().all_gather_object(sent, (mine, self.value))
        failed = [(rank, err) for rank, (err, _) in enumerate(sent) if err is not None]
        if failed:
            raise DistributedError(_failure(failed, world)) from exc
        self.values = [value for _, value in sent]
        return False


def _failure(failed: list[tuple[int, str]], world: int) -> str:
    rank, err = failed[0]
    if len(failed) == world and all(e == err for _, e in failed):
        return f"every rank of {world} failed: {err}"
    also = [str(r) for r, _ in failed[1:]]
    more = f" (rank{'s' if len(also) > 1 else ''} {', '.join(also)} too)" if also else ""
    return f"rank {rank} of {world} failed{more}: {err}"


_opened: Group | None = None  # the group ``session`` initialised (a nested session uses it)


@contextmanager
def session(device: torch.device | str | None = None,
            timeout: float = TIMEOUT) -> Iterator[Group]:
    """The job's ``Group``. A process group already initialised (by the caller's script) is
    used and left as it is; under ``torchrun`` with more than one process, one is initialised
    here from its environment and destroyed at the end: ``gloo``, or ``nccl`` when ``device``
    is a GPU (it must be the GPU of this process's ``LOCAL_RANK``, ``local_cuda``, which becomes
    the current device); its collectives give up after ``timeout`` seconds. Otherwise a
    one-process ``Group``."""
    global _opened
    dist = _dist()
    if dist is not None and dist.is_initialized():
        yield _opened or Group(dist.get_rank(), dist.get_world_size())
        return
    if launched_world() <= 1:
        yield Group()
        return
    if dist is None:
        raise DistributedError(f"torchrun started {launched_world()} processes, but this torch "
                               f"build has no torch.distributed")
    # torch._dynamo imported after the group exists (unpickling a timm model does) holds
    # references to it, so destroy_process_group cannot free it and its gloo threads are torn
    # down at interpreter exit, now and then with an abort: imported before
    import torch._dynamo  # noqa: F401

    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        own = local_cuda()
        torch.cuda.set_device(own)  # the communicator's GPU, even when the model is elsewhere
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=timedelta(seconds=timeout))
    try:
        _opened = Group(dist.get_rank(), dist.get_world_size(), timeout)
        if device.type == "cuda":
            with _opened.step():  # every rank names the ranks whose model is on another's GPU
                _check_gpu(device, own)
        yield _opened
    finally:
        _opened = None
        dist.destroy_process_group()


def _check_gpu(device: torch.device, own: torch.device) -> None:
    if device.index is not None and device.index != own.index:
        raise ValueError(f"the model is on {device}, but this process's GPU is {own} (its "
                         f"LOCAL_RANK {os.environ.get('LOCAL_RANK', '0')}): under torchrun each "
                         f"process runs on the GPU of its local rank; move the model there")
