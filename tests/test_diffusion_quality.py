"""Issue 41: the committed CIFAR-10 diffusion model loads into the model its training script
builds, and two DDIM steps at batch 2 run through every kind of row of the quality benchmark
(``benchmarks/diffusion``). The benchmark itself is a script, not a test."""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("tomesd")
DIFFUSION = Path(__file__).resolve().parents[1] / "benchmarks" / "diffusion"
sys.path.insert(0, str(DIFFUSION))
import model as M  # noqa: E402
from rows import build, rows  # noqa: E402


@pytest.fixture(scope="module")
def net():
    return M.load(DIFFUSION / "cifar_unet.safetensors")


@pytest.fixture(scope="module")
def inputs(net):
    noise = torch.randn(2, 12, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return net.condition(torch.tensor([3, 8])), net.condition(torch.tensor([M.NULL])), noise


def test_weights_load_into_the_training_scripts_model(net):
    from safetensors.torch import load_file
    saved = load_file(str(DIFFUSION / "cifar_unet.safetensors"))
    fresh = M.ClassUNet().state_dict()
    assert saved.keys() == fresh.keys()
    assert all(saved[k].shape == fresh[k].shape for k in saved)
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())


def one_per_family():
    seen, out = set(), []
    for row in rows():
        if row.family not in seen:
            seen.add(row.family)
            out.append(row)
    return out


@pytest.fixture(scope="module")
def unmerged(net, inputs):
    return M.sample(net.unet, *inputs, steps=2)


# by default: the authors' two and one row of each tome_fx method (the kv-merge budget: the
# fold and the similarity-branch budget); the other families are the slow twins
DEFAULT = {"tomesd (authors)", "tomesd", "todo (authors)", "todo", "kv-merge fold @budget"}


@pytest.mark.parametrize("row", [r if r.family in DEFAULT else pytest.param(r, marks=pytest.mark.slow)
                                 for r in one_per_family()[1:]], ids=lambda r: r.name)
def test_two_steps_through_every_method(net, inputs, unmerged, row):
    torch.manual_seed(0)
    images = M.sample(build(row, net, batch=4), *inputs, steps=2)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert not torch.equal(images, unmerged)  # the method changed something
    assert (images - unmerged).abs().mean() < 0.2  # and not everything
