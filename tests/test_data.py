"""Real inputs: loading (folders, .npz, text), calibration (``optimize(calibration=...)``, the
data-free rule), ``tome_fx.sweep`` and ``tome-fx sweep`` / ``--data``, and one-line errors for
bad data."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import tome_fx
from tome_fx import cli
from tome_fx.sweep import mcnemar

NAME, SIZE = "vit_tiny_patch16_224", "3,64,64"


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model(NAME, img_size=64, pretrained=False).eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A class-folder tree (2 classes x 6 PNGs), a flat folder, and the same pixels as .npz."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(12, 40, 48, 3), dtype=np.uint8)
    labels = np.array([0] * 6 + [1] * 6)
    for i, (p, y) in enumerate(zip(pixels, labels)):
        (root / "tree" / f"c{y}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(p).save(root / "tree" / f"c{y}" / f"{i:02d}.png")
        (root / "flat").mkdir(exist_ok=True)
        Image.fromarray(p).save(root / "flat" / f"{i:02d}.png")
    np.savez(root / "arrays.npz", images=pixels, labels=labels)
    return root, pixels, labels


def test_folder_npz_and_flat_load_the_same_pixels(vit, images):
    root, pixels, labels = images
    tree = tome_fx.load_data(root / "tree", vit)
    arrays = tome_fx.load_data(root / "arrays.npz", vit)
    flat = tome_fx.load_data(root / "flat", vit)
    assert tree.images.shape == (12, 3, 64, 64) and tree.classes == ("c0", "c1")
    assert tree.labels.tolist() == labels.tolist() and flat.labels is None
    torch.testing.assert_close(tree.images, arrays.images, rtol=0, atol=0)
    torch.testing.assert_close(flat.images, arrays.images, rtol=0, atol=0)
    # timm's transform for the model: resize + centre crop + its mean/std, not ours
    cfg = timm.data.resolve_data_config({"input_size": (3, 64, 64)}, model=vit)
    assert cfg["crop_pct"] == 0.9 and cfg["mean"] == (0.5, 0.5, 0.5)
    ref = timm.data.create_transform(**cfg)(Image.fromarray(pixels[3]))
    torch.testing.assert_close(tree.images[3], ref, rtol=0, atol=0)
    calib, rest = tree.split(4)
    assert len(calib) == 4 and len(rest) == 8 and calib.split(1)[0].images.shape[0] == 1
    assert sorted(calib.labels.tolist() + rest.labels.tolist()) == sorted(labels.tolist())


def test_mean_std_for_a_source_without_config(images):
    root, pixels, _ = images
    data = tome_fx.load_data(root / "arrays.npz", torch.nn.Identity(), mean=(0.5, 0.4, 0.3),
                             std=(0.2, 0.2, 0.25), input_size=(3, 40, 48))
    expect = (torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255
              - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2, 0.2, 0.25]).view(1, 3, 1, 1)
    torch.testing.assert_close(data.images, expect, rtol=1e-6, atol=1e-6)
    with pytest.raises(tome_fx.DataError, match="--mean, --std, --input-size"):
        tome_fx.load_data(root / "arrays.npz", torch.nn.Identity())


def test_data_free_rule_and_calibration(vit, images):
    root, _, _ = images
    data = tome_fx.load_data(root / "tree", vit)
    x = data.inputs()
    free = tome_fx.plan(vit, flops_budget=0.6, example_inputs=x)
    const = tome_fx.plan(vit, flops_budget=0.6, example_inputs=x, strategy="constant")
    assert free.r == const.r and free.strategy == "auto"
    assert any("no calibration data, so the data-free rule" in n for n in free.notes)
    calibrated = tome_fx.plan(vit, flops_budget=0.6, calibration=data)
    assert any("drifts least on the calibration inputs" in n for n in calibrated.notes)
    assert not any("data-free" in n for n in calibrated.notes)
    with pytest.raises(ValueError, match="apart from the batch"):
        tome_fx.optimize(vit, flops_budget=0.6, example_inputs=x,
                         calibration=torch.randn(2, 3, 32, 32))


def test_mcnemar_exact():
    # two-sided exact binomial on the discordant pairs: 1 vs 9 -> 2 * (1 + 10) / 2**10
    assert math.isclose(mcnemar(1, 9), 22 / 1024) and mcnemar(5, 5) == 1.0 and mcnemar(0, 0) == 1.0


def test_sweep_rows_pairs_and_plot(vit, images, tmp_path):
    root, _, _ = images
    data = tome_fx.load_data(root / "tree", vit)
    res = tome_fx.sweep(vit, data, budgets=(1, 0.7), calibration=4, runs=1, warmup=0, quiet=True)
    assert [(r.strategy, r.budget) for r in res.rows] == [
        ("original", 1.0), ("auto", 0.7), ("constant", 0.7)]
    assert res.evaluated == 8 and res.rows[0].top1 is not None and res.rows[0].agreement == 100
    for row in res.rows[1:]:
        fast = tome_fx.optimize(vit, flops_budget=0.7, calibration=data.split(4)[0],
                                strategy=row.strategy)
        assert row.r == tuple(fast.tome.r) and 0.69 <= row.ratio <= 0.7
        rest = data.split(4)[1]
        with torch.no_grad():
            pred = fast(rest.images).argmax(-1)
            ref = vit(rest.images).argmax(-1)
        assert row.top1 == pytest.approx(100 * float((pred == rest.labels).double().mean()))
        assert row.agreement == pytest.approx(100 * float((pred == ref).double().mean()))
        assert row.items_per_s > 0
    (pair,) = res.pairs
    auto, const = res.rows[1], res.rows[2]
    assert pair.only_default - pair.only_constant == round((auto.top1 - const.top1) * 8 / 100)
    res.plot(tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "auto" in str(res) and "McNemar" in str(res)


def _main(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_sweep_json_and_report_data(images, tmp_path, capsys):
    root, _, _ = images
    code, out, _ = _main(capsys, "sweep", f"timm:{NAME}", "--input-size", SIZE, "--data",
                         root / "tree", "--calib", "4", "--budgets", "1,0.7", "--strategy",
                         "constant", "--no-throughput", "--quiet", "--json", tmp_path / "s.json",
                         "--plot", tmp_path / "s.png")
    assert code == 0 and "constant" in out and "top-1 %" in out
    saved = json.loads((tmp_path / "s.json").read_text())
    assert [r["strategy"] for r in saved["rows"]] == ["original", "constant"]
    assert saved["evaluated"] == 8 and (tmp_path / "s.png").exists()
    code, out, _ = _main(capsys, "report", f"timm:{NAME}", "--input-size", SIZE,
                         "--flops-budget", "0.7", "--data", root / "tree", "--calib", "4")
    assert code == 0 and "fidelity on 8 real" in out and "top-1 accuracy" in out
    assert "drifts least on the calibration inputs" in out and "random, not your data" not in out
    code, out, _ = _main(capsys, "report", f"timm:{NAME}", "--input-size", SIZE,
                         "--flops-budget", "0.7")
    assert "random, not your data: pass --data PATH" in out and "data-free rule" in out
    code, out, _ = _main(capsys, "bench", f"timm:{NAME}", "--input-size", SIZE, "--r", "2",
                         "--data", root / "tree", "--calib", "4", "--batch-size", "5", "--runs",
                         "1", "--warmup", "0", "--device", "cpu", "--json", tmp_path / "b.json")
    info = json.loads((tmp_path / "b.json").read_text())
    assert code == 0 and info["batch"] == 5 and info["input_shape"] == [5, 3, 64, 64]
    assert info["data"] == str(root / "tree") and info["results"][0]["speedup"] > 0


def test_bad_data_is_one_line(images, tmp_path, capsys):
    root, pixels, _ = images
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    np.savez(tmp_path / "rgba.npz", images=np.zeros((3, 8, 8, 4), np.uint8))
    np.savez(tmp_path / "labels.npz", images=pixels[:4], labels=np.array([0, 1, 2, 1000]))
    (tmp_path / "s.txt").write_text("a sentence\n")
    src = ("sweep", f"timm:{NAME}", "--input-size", SIZE, "--no-throughput", "--calib", "0",
           "--budgets", "1,0.9", "--quiet", "--data")
    cases = [
        (tmp_path / "empty", "no images in"),
        (tmp_path / "broken", "cannot read image"),
        (tmp_path / "rgba.npz", "images have 4 channel(s), the model takes 3"),
        (tmp_path / "labels.npz", "go up to 1000, but the model outputs 1000 classes"),
        (tmp_path / "s.txt", "is a text file (one sentence per line), but the model takes images"),
        (tmp_path / "missing", "no such data file or folder"),
    ]
    for path, text in cases:
        code, _, err = _main(capsys, *src, path)
        assert code == 2 and err.startswith("tome-fx: error:") and text in err, err
        assert err.count("\n") == 1
    code, _, err = _main(capsys, "sweep", f"timm:{NAME}", "--data", root / "tree", "--budgets",
                         "1,2")
    assert code == 2 and "flops_budget must be in (0, 1]" in err


def test_huggingface_image_processor_preprocesses(images, tmp_path, capsys):
    # a HuggingFace directory's own image processor, not timm's transforms, prepares the images
    transformers = pytest.importorskip("transformers")
    root, pixels, labels = images
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=2)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path / "vit")
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32},
                                               image_mean=[0.2, 0.3, 0.4], image_std=[0.5] * 3)
    processor.save_pretrained(tmp_path / "vit")
    model = transformers.ViTForImageClassification.from_pretrained(tmp_path / "vit")
    data = tome_fx.load_data(root / "tree", model, model_dir=tmp_path / "vit")
    expect = processor(images=[Image.fromarray(p) for p in pixels], return_tensors="pt")
    torch.testing.assert_close(data.images, expect["pixel_values"], rtol=0, atol=0)
    code, out, err = _main(capsys, "sweep", tmp_path / "vit", "--data", root / "tree",
                           "--calib", "4", "--budgets", "1,0.8", "--strategy", "constant",
                           "--no-throughput", "--quiet")
    assert code == 0 and "top-1 %" in out, err


def test_text_classifier_is_scored_by_agreement(tmp_path):
    # A HuggingFace text classifier returns .logits: its rows get top-1 agreement with the
    # original's predictions (recomputed here), not nearest-neighbour agreement of embeddings.
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(40)]
    tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    cfg = transformers.BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, num_labels=3,
                                  initializer_range=0.5)  # spread logits: predictions differ
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    rng = np.random.default_rng(0)
    lines = [" ".join(f"w{i}" for i in rng.integers(0, 40, size=40)) for _ in range(48)]
    (tmp_path / "s.txt").write_text("\n".join(lines) + "\n")
    data = tome_fx.load_data(tmp_path / "s.txt", model, tokenizer=tok)
    res = tome_fx.sweep(model, data, budgets=(1, 0.65), strategies=("constant",), calibration=0,
                        batch_size=8, measure=False, quiet=True)
    row = res.rows[1]
    assert row.nn_agreement is None and row.top1 is None
    fast = tome_fx.optimize(model, flops_budget=0.65, strategy="constant",
                            example_inputs=data.inputs(0, 2))
    assert row.r == tuple(fast.tome.r) and sum(row.r) > 0
    with torch.no_grad():
        x = data.inputs()
        pred = model(**x).logits.argmax(-1)
        same = fast(**x).logits.argmax(-1) == pred
    assert len(set(pred.tolist())) > 1  # the original does not predict one class for all
    assert row.agreement == pytest.approx(100 * float(same.double().mean()))


def test_interleaved_rounds_rotate_the_order():
    from tome_fx.timing import interleaved

    order = []
    fns = [lambda x, i=i: order.append(i) for i in range(3)]
    times = interleaved(fns, (torch.zeros(1),), warmup=1, runs=3, clock=iter(range(100)).__next__)
    assert order == [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2]  # round i starts with function i mod 3
    assert times == [[1, 1, 1]] * 3


def test_sweep_times_each_row_in_the_same_rounds_as_the_original(monkeypatch):
    """On a machine getting busier (a clock whose every call lasts longer than the one before),
    an original timed once, first, looks fast and every row slow. Timed in the same rounds as
    each row, original and rewritten see the same load: equal modules, speed-up near 1."""
    import importlib

    from tome_fx import timing

    sweep_module = importlib.import_module("tome_fx.sweep")  # tome_fx.sweep is the function

    ticks = iter(range(10 ** 6))
    paired = []

    def compare(original, rewritten, inputs, warmup, runs, bar=None):
        paired.append(original)
        return timing.compare(original, rewritten, inputs, warmup, runs, bar,
                              clock=lambda: next(ticks) ** 2)

    monkeypatch.setattr(sweep_module, "compare", compare)
    vit = timm.create_model(NAME, img_size=32, patch_size=8, depth=2, pretrained=False).eval()
    data = tome_fx.Data.from_tensors(torch.randn(4, 3, 32, 32))
    res = tome_fx.sweep(vit, data, budgets=(1, 0.8, 0.6), strategies=("constant",),
                        calibration=0, batch_size=4, warmup=1, runs=6, quiet=True)
    assert len(paired) == 2 and all(p is vit for p in paired)
    # an even number of rounds: each module goes first in half of them (timed alone, one
    # after the other, the second would look 3x slower on this clock)
    assert [r.speedup for r in res.rows] == pytest.approx([1.0] * 3, abs=0.02)


def test_mean_std_must_match_the_channels(images, tmp_path, capsys):
    root, _, _ = images
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4)).eval()
    torch.save(model, tmp_path / "m.pt")
    src = ("sweep", tmp_path / "m.pt", "--trust-pickle", "--input-size", "3,32,32", "--data",
           root / "arrays.npz", "--budgets", "1")
    for flag, values in (("--mean", "0.5,0.5"), ("--std", "0.2,0.2,0.2,0.2")):
        other = "--std" if flag == "--mean" else "--mean"
        code, _, err = _main(capsys, *src, flag, values, other, "0.5,0.5,0.5")
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"tome-fx: error: {flag} has ") and "3-channel images" in err
    code, _, err = _main(capsys, "sweep", f"timm:{NAME}", "--input-size", SIZE, "--data",
                         root / "arrays.npz", "--mean", "0.5,0.5", "--budgets", "1")
    assert code == 2 and "--mean has 2 values" in err and "3-channel" in err, err
