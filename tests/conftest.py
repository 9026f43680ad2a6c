import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))  # cifar_vit: the ../shared ViT's code
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_floor(request, monkeypatch):
    """The suite's tiny text models have 9-65 tokens, below or near the fidelity floor
    ``optimize`` and ``plan`` set by default for token ids (``min_tokens="auto"``: 24): their
    tests are about merging itself, so they run without it (vision models get no floor by
    default anyway). Tests marked ``floor_default`` (tests/test_floor.py) keep the default."""
    if request.node.get_closest_marker("floor_default") is None:
        import tome_fx.cost.floor

        monkeypatch.setattr(tome_fx.cost.floor, "MIN_TOKENS", 0)  # what "auto" resolves to


@pytest.fixture(scope="session")
def cifar():
    """(the real-weight CIFAR-10 ViT, its first 64 test images normalised, their labels), read
    from ../shared in place; the test is skipped, with the reason, where ../shared lacks them."""
    import cifar_vit as cv

    if not cv.available():
        pytest.skip(cv.missing_reason())
    x, y = cv.load_test(64)
    return cv.load_model(), x, y
