"""``tome-fx sweep`` and ``tome_fx.sweep`` split over processes (gloo, 2 CPU processes): the
numbers of one process, each process a half of the inputs; a process that fails stops every
process with one line naming it."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import tome_fx
from tome_fx import cli
from tome_fx.distributed import _check_gpu, local_cuda, session

from test_distributed import _free_port

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 120  # seconds: the bound a launch must end within (a hang fails the test)
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch build has no gloo backend")


def _model():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                             num_classes=3).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A pickled tiny ViT; 12 images in 3 class folders; one image; 4 images and a broken one."""
    root = tmp_path_factory.mktemp("dist")
    torch.save(_model(), root / "m.pt")
    pixels = np.random.default_rng(0).integers(0, 256, size=(12, 40, 48, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):
        (root / "tree" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(p).save(root / "tree" / f"c{i % 3}" / f"{i:02d}.png")
    (root / "one").mkdir()
    Image.fromarray(pixels[0]).save(root / "one" / "a.png")
    (root / "broken").mkdir()
    for i in range(4):
        Image.fromarray(pixels[i]).save(root / "broken" / f"{i}.png")
    (root / "broken" / "4.png").write_bytes(b"not a png")  # the last batch: rank 1's
    return root


def _sweep_args(root, data, *extra):
    return ["sweep", str(root / "m.pt"), "--trust-pickle", "--data", str(root / data),
            "--budgets", "1,0.7", "--batch-size", "2", "--no-throughput", "--device", "cpu",
            *extra]


def _torchrun(root, tmp_path, *args, **env) -> tuple[int, dict]:
    """Exit code of ``torchrun --nproc_per_node 2 ARGS`` (``-m tome_fx ...``, or a script) and
    each rank's stdout and stderr ({rank: (out, err)}, from torchrun's per-rank log files). It
    must end within ``LAUNCH_TIMEOUT``; past it torchrun and its workers are killed."""
    logs = tmp_path / "logs"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "RECORD": str(tmp_path), **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "--redirects", "3", "--log-dir", str(logs), *args]
    launch = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        launch.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(launch.pid, signal.SIGKILL)  # torchrun and the workers it started
        launch.communicate()
        pytest.fail(f"torchrun {' '.join(args)} still running after {LAUNCH_TIMEOUT} s")
    ranks = {}
    for rank in (0, 1):
        (folder,) = logs.glob(f"*/attempt_0/{rank}")
        ranks[rank] = ((folder / "stdout.log").read_text(), (folder / "stderr.log").read_text())
    return launch.returncode, ranks


def _without(d: dict, *keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def test_torchrun_sweep_equals_one_process(files, tmp_path):
    # 12 images, 4 calibrate (rank 0 plans `auto` on them): 8 evaluated in 4 batches of 2
    args = _sweep_args(files, "tree", "--calib", "4", "--json")
    code, ranks = _torchrun(files, tmp_path, _launcher(tmp_path), *args,
                            str(tmp_path / "two.json"))
    assert code == 0, ranks
    (out0, err0), (out1, err1) = ranks[0], ranks[1]
    assert "tome-fx sweep:" in out0 and out1 == "" and err0 == "" and err1 == ""
    # the group is destroyed and freed (its gloo threads would otherwise meet interpreter exit)
    assert [(tmp_path / f"freed.{rank}").read_text() for rank in (0, 1)] == ["[True]"] * 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process (OMP_NUM_THREADS=1)
    try:
        assert cli.main(args + [str(tmp_path / "one.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    two = json.loads((tmp_path / "two.json").read_text())
    one = json.loads((tmp_path / "one.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["items_per_rank"] == [4, 4] and one["items_per_rank"] == [8]
    assert [r["strategy"] for r in two["rows"]] == ["original", "auto", "constant"]
    assert two["pairs"] and two["rows"][1]["right"] is not None
    assert _without(two, "world_size", "items_per_rank") == \
        _without(one, "world_size", "items_per_rank")


@pytest.mark.parametrize("data, failed, error", [
    ("one", "rank 1 of 2 failed: DataError: nothing to evaluate: 1 evaluation input(s)",
     "fewer than the 2 processes"),
    ("broken", "rank 1 of 2 failed: DataError: cannot read image", "4.png"),
])
def test_a_failing_rank_stops_every_rank_with_one_line(files, tmp_path, data, failed, error):
    code, ranks = _torchrun(files, tmp_path, "-m", "tome_fx",
                            *_sweep_args(files, data, "--calib", "0"))
    assert code != 0
    for rank, (out, err) in ranks.items():
        assert out == "" and err.count("\n") == 1, (rank, err)
        assert err.startswith(f"tome-fx: error: {failed}") and error in err, (rank, err)


LAUNCHER = """import os, sys, time, weakref
import torch.distributed as dist
import tome_fx.data
from tome_fx.cli import main

groups, destroy, decode = [], dist.destroy_process_group, tome_fx.data.Listing.load


def destroyed(*args):  # the group the sweep destroys, to see that it is freed
    groups.append(weakref.ref(dist.distributed_c10d._get_default_group()))
    destroy(*args)


def stalled(self):  # a hung file system on rank STALL_RANK, while it decodes its share
    if os.environ["RANK"] == os.environ.get("STALL_RANK"):
        time.sleep(600)
    return decode(self)


dist.destroy_process_group, tome_fx.data.Listing.load = destroyed, stalled
code = main()
with open(os.path.join(os.environ["RECORD"], "freed." + os.environ["RANK"]), "w") as f:
    f.write(repr([group() is None for group in groups]))
sys.exit(code)
"""


def _launcher(tmp_path) -> str:
    """``tome-fx`` (``cli.main``) with what the tests watch: whether the process group is
    freed once destroyed (``RECORD/freed.RANK``), and a rank that hangs (``STALL_RANK``)."""
    (tmp_path / "launch.py").write_text(LAUNCHER)
    return str(tmp_path / "launch.py")


def test_a_stuck_rank_stops_the_job_after_the_timeout(files, tmp_path):
    start = time.monotonic()
    code, ranks = _torchrun(files, tmp_path, _launcher(tmp_path),
                            *_sweep_args(files, "tree", "--calib", "4", "--dist-timeout", "5"),
                            STALL_RANK="1")
    assert code != 0 and time.monotonic() - start < 60
    out, err = ranks[0]  # rank 1, still asleep, is stopped by torchrun
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith("tome-fx: error: rank 0 of 2: a step with the other processes failed "
                          "(one stopped, or kept the others waiting longer than 5 s): "), err


def _worker(rank: int, world: int, ports: tuple[int, int], out: str):
    """As torchrun starts it (its environment): the sweep initialises the process group and
    destroys it at the end. Then the caller's own group: used, and left initialised."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    x, y = _inputs()
    res = tome_fx.sweep(_model(), tome_fx.Data.from_tensors(x, y), budgets=(1, 0.6),
                        strategies=("constant",), calibration=0, batch_size=3, runs=1,
                        warmup=0, quiet=True)
    after_sweep = dist.is_initialized()
    os.environ["MASTER_PORT"] = str(ports[1])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with session() as group:
            sent = group.broadcast(f"from rank {rank}")
        dist.barrier()  # still usable
        torch.save({"result": res.to_dict(), "initialised_after_sweep": after_sweep,
                    "group": (group.rank, group.world), "sent": sent,
                    "left_initialised": dist.is_initialized()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(11, 3, 32, 32, generator=g), torch.arange(11) % 3


def test_api_sweep_under_torchrun_and_in_the_callers_group(tmp_path):
    out = str(tmp_path / "res")
    mp.spawn(_worker, args=(2, (_free_port(), _free_port()), out), nprocs=2, join=True)
    got = [torch.load(f"{out}.{rank}") for rank in (0, 1)]
    assert not any(g["initialised_after_sweep"] for g in got)  # its group destroyed
    assert [g["group"] for g in got] == [(0, 2), (1, 2)]
    assert all(g["sent"] == "from rank 0" and g["left_initialised"] for g in got)
    assert got[0]["result"] == got[1]["result"]
    two = got[0]["result"]
    x, y = _inputs()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = tome_fx.sweep(_model(), tome_fx.Data.from_tensors(x, y), budgets=(1, 0.6),
                            strategies=("constant",), calibration=0, batch_size=3,
                            measure=False).to_dict()
    finally:
        torch.set_num_threads(threads)
    # 11 inputs in batches of 3: 4 batches, 2 each (the last one short)
    assert two["world_size"] == 2 and two["items_per_rank"] == (6, 5)
    assert "the sum over 2 processes" in two["throughput_note"]
    rates = ("items_per_s", "speedup")
    assert all(r["items_per_s"] > 0 for r in two["rows"])
    assert [_without(r, *rates) for r in two["rows"]] == [_without(r, *rates) for r in one["rows"]]
    assert two["threads"] == 1 and one["threads"] is None  # _worker times on one thread
    assert _without(two, "rows", "world_size", "items_per_rank", "throughput_note",
                    "throughput_batch", "threads") == \
        _without(one, "rows", "world_size", "items_per_rank", "throughput_note",
                 "throughput_batch", "threads")


def test_optimize_planned_builds_the_planned_module():
    # what a rank other than 0 does: the module from rank 0's plan, without the search
    model, (x, _) = _model(), _inputs()
    calib = x[:4]
    searched = tome_fx.optimize(model, flops_budget=0.6, calibration=calib)
    rebuilt = tome_fx.optimize(model, flops_budget=0.6, calibration=calib, planned=searched.tome)
    assert rebuilt.tome == searched.tome and sum(searched.tome.r) > 0
    from_plan = tome_fx.optimize(model, example_inputs=(calib,),
                                 planned=tome_fx.plan(model, 0.6, calibration=calib))
    assert from_plan.tome.scales and from_plan.tome.r == searched.tome.r  # scales, as optimize
    with torch.no_grad():
        assert torch.equal(rebuilt(x), searched(x)) and torch.equal(from_plan(x), searched(x))
    with pytest.raises(ValueError, match="either r or planned"):
        tome_fx.optimize(model, r=2, planned=searched.tome)
    with pytest.raises(ValueError, match="^planned= takes a ToMe plan .method='tome'., not "
                                         "method='tomato'$"):
        tome_fx.optimize(model, flops_budget=0.6, method="tomato", planned=searched.tome)


def test_each_process_on_the_gpu_of_its_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_cuda() == torch.device("cuda", 1)
    _check_gpu(torch.device("cuda", 1), local_cuda())
    with pytest.raises(ValueError, match=r"^the model is on cuda:0, but this process's GPU is "
                                         r"cuda:1 \(its LOCAL_RANK 1\)"):
        _check_gpu(torch.device("cuda", 0), local_cuda())
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="^local rank 2 has no GPU of its own: this machine "
                                         "shows 2; start at most 2 processes per machine"):
        local_cuda()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # CUDA_VISIBLE_DEVICES per process
    assert local_cuda() == torch.device("cuda", 0)


def test_dist_timeout_must_be_positive(capsys):
    assert cli.main(["sweep", "timm:vit_tiny_patch16_224", "--data", "x", "--dist-timeout",
                     "0"]) == 2
    assert capsys.readouterr().err == ("tome-fx: error: --dist-timeout must be > 0 seconds, "
                                       "got 0\n")
