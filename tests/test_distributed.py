"""Fine-tuning through a rewritten module under DistributedDataParallel (gloo, 2 CPU processes)
gives the gradients of one process on the same samples."""
import os
import socket

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import tome_fx

BATCH = 4  # split over 2 ranks, 2 samples each


def _setup():
    """The same rewritten model and samples in every process (seeded); float64, so that the
    comparison measures the split, not float32 summation order."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4, num_classes=5).double()
    x = torch.randn(BATCH, 3, 64, 64, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    y = torch.arange(BATCH) % 5
    fast = tome_fx.optimize(model.eval(), r=4, example_inputs=(x[:2],))
    return fast.train(), x, y


def _grads(module) -> dict:
    return {name: p.grad.detach().clone() for name, p in module.named_parameters()
            if p.grad is not None}


def _worker(rank: int, world: int, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fast, x, y = _setup()
        ddp = torch.nn.parallel.DistributedDataParallel(fast)
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        F.cross_entropy(ddp(x[part]), y[part]).backward()  # DDP averages the ranks' gradients
        if rank == 0:
            torch.save(_grads(ddp.module), out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="this torch build has no gloo backend")
def test_ddp_gradients_equal_single_process(tmp_path):
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    ddp = torch.load(out)
    fast, x, y = _setup()
    assert fast.tome_counts["merges"] >= 3  # merging is really in the trained path
    F.cross_entropy(fast(x), y).backward()
    single = _grads(fast)
    assert ddp.keys() == single.keys() and len(single) == len(list(fast.parameters()))
    worst = max((ddp[k] - single[k]).abs().max().item() for k in single)
    assert worst <= 1e-6, worst
