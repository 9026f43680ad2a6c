"""The command line: in this process (``cli.main``, no import time per run), and as a subprocess
(``python -m tome_fx``) like a user would for the README's main job and a --debug traceback."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import tome_fx
from tome_fx import cli
from tome_fx.cli.report import format_text
from tome_fx.track import track_sources
from tome_fx.cli.visualize import group_ids, load_image, normalization

ROOT = Path(__file__).resolve().parents[1]
NAME = "vit_tiny_patch16_224"
SIZE = (3, 64, 64)  # 16 patches + class token: small and fast
SIZE_ARG = "3,64,64"


def _cmd(args):
    return [sys.executable, "-m", "tome_fx", *map(str, args)]


def run(*args, env=None):
    return subprocess.run(_cmd(args), capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


def run_here(capsys, *args):
    """``tome-fx ARGS`` in this process (no import time), as a CompletedProcess."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exc:  # argparse's own exits
        code = exc.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def assert_error(res, *texts):
    assert res.returncode == 2, (res.args, res.stdout, res.stderr)
    assert res.stderr.startswith("tome-fx: error:"), res.stderr
    for text in texts:
        assert text in res.stderr, (text, res.stderr)
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr


def timm_model(seed):
    torch.manual_seed(seed)
    return timm.create_model(NAME, img_size=SIZE[1:], pretrained=False).eval()


def cli_inputs(batch=2, size=SIZE):
    """What the CLI feeds a model: randn from a generator seeded with 0."""
    return (torch.randn(batch, *size, generator=torch.Generator().manual_seed(0)),)


def cosine_top1(model, fast, x):
    with torch.no_grad():
        a, b = model(*x), fast(*x)
    cos = F.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()
    return cos, (a.argmax(-1) == b.argmax(-1)).double().mean().item()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.save(timm_model(1), d / "model.pt")  # weights differ from the CLI's seed-0 timm: build
    torch.save(timm_model(2).state_dict(), d / "weights.pth")
    torch.save({"classifier.weight": torch.zeros(3, 3)}, d / "other.pth")
    (d / "notes.pt").write_text("not a model\n")
    from models import Untraceable

    torch.save(Untraceable(), d / "untraceable.pt")
    # a 64x64 image of 4x4 flat colour blocks (one per patch, some colours repeated)
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, size=(6, 3))[rng.integers(0, 6, size=(4, 4))].astype(np.uint8)
    Image.fromarray(colours).resize((64, 64), Image.NEAREST).save(d / "image.png")
    return d


def test_pickled_model_needs_trust_and_json_matches_api(files, capsys):
    path = files / "model.pt"
    refused = run_here(capsys, "report", path)
    res = run_here(capsys, "report", path, "--trust-pickle", "--flops-budget", "0.6", "--format", "json")
    assert_error(refused, "--trust-pickle", "timm.models.vision_transformer.VisionTransformer")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)

    model = torch.load(path, weights_only=False)
    x = cli_inputs()
    plan = tome_fx.plan(model, 0.6, example_inputs=x)
    assert [b["r"] for b in data["blocks"]] == plan.r
    assert [(b["tokens_in"], b["tokens_out"], b["flops_after"]) for b in data["blocks"]] == [
        (b.tokens_in, b.tokens_out, b.flops) for b in plan.blocks]
    assert [(b["site"], b["attention"], b["norm"]) for b in data["blocks"]] == [
        (b.site, b.kind, b.norm) for b in plan.blocks]
    assert data["protected_tokens"] == plan.protected == 1
    assert data["skipped"] == [{"site": s.site, "reason": s.reason} for s in plan.skipped]
    t = data["totals"]
    assert (t["flops_before"], t["flops_after"]) == (plan.flops_original, plan.flops)
    assert t["flop_ratio"] == pytest.approx(plan.ratio) and 0.59 <= t["flop_ratio"] <= 0.6
    assert t["predicted_speedup"] == pytest.approx(1 / t["flop_ratio"])
    assert sum(b["flops_before"] for b in data["blocks"]) + t["flops_outside_blocks_before"] == t["flops_before"]
    assert data["request"] == {"flops_budget": 0.6, "r": None, "strategy": "auto"}
    assert data["frontend"] == plan.frontend

    fast = tome_fx.optimize(model, r=plan.r, example_inputs=x)
    assert fast.tome.r == plan.r
    n_params = sum(p.numel() for p in model.parameters())
    assert t["params_original"] == t["params_rewritten"] == n_params and t["params_unchanged"]
    cos, top1 = cosine_top1(model, fast, x)
    assert data["fidelity"]["cosine_mean"] == pytest.approx(cos, abs=1e-6)
    assert data["fidelity"]["top1_agreement"] == top1
    assert data["fidelity"]["samples"] == 2 and data["input_shape"] == [[2, *SIZE]]
    md = format_text(data, "markdown").splitlines()  # --format markdown renders this same data
    assert md[0].startswith("## tome-fx report: ") and "flops budget 0.6" in md[0]
    rows = [ln for ln in md if re.match(r"\|\s+\d+ \| blocks\.", ln)]
    assert len(rows) == 12 and all(f"| {b['tokens_in']} -> {b['tokens_out']} " in ln
                                   for ln, b in zip(rows, data["blocks"]))


def test_timm_name_table_with_bench(capsys):
    res = run_here(capsys, "report", f"timm:{NAME}", "--input-size", SIZE_ARG, "--r", "3", "--bench",
              "--runs", "2", "--warmup", "1")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    plan = tome_fx.optimize(timm_model(0), r=3, example_inputs=cli_inputs()).tome
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+\s+blocks\.\d+\.attn", line)]
    assert len(rows) == len(plan.blocks) == 12
    for line, b in zip(rows, plan.blocks):
        assert f"{b.tokens_in} -> {b.tokens_out}" in line and "sdpa, pre-norm" in line
    assert "MFLOPs before" in out and "protected prefix tokens (never merged): 1" in out
    assert "skipped sites: none" in out and "(unchanged)" in out
    assert "fidelity on 2 random inputs: output cosine similarity" in out and "top-1 agreement" in out
    speeds = re.search(r"original ([\d.]+)/s, rewritten ([\d.]+)/s, measured speed-up ([\d.]+)x", out)
    assert speeds and float(speeds[1]) > 0 and float(speeds[2]) > 0
    assert float(speeds[3]) == pytest.approx(float(speeds[2]) / float(speeds[1]), abs=0.01)


def test_state_dict_and_checkpoint(files, capsys):
    base = ("report", f"timm:{NAME}", "--input-size", SIZE_ARG)
    plain, other, res = (run_here(capsys, *args) for args in [
        ("report", files / "weights.pth"),
        (*base, "--checkpoint", files / "other.pth"),
        (*base, "--checkpoint", files / "weights.pth", "--r", "2", "--format", "json"),
    ])
    assert_error(plain, "state dict", "architecture is needed", "--checkpoint")
    assert_error(other, "does not match", "missing keys", "unexpected keys: classifier.weight")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    x = cli_inputs()
    loaded = timm_model(2)  # the checkpoint's weights
    cos, _ = cosine_top1(loaded, tome_fx.optimize(loaded, r=2, example_inputs=x), x)
    assert data["fidelity"]["cosine_mean"] == pytest.approx(cos, abs=1e-6)
    unloaded = timm_model(0)  # what timm: gives without the checkpoint: must differ
    cos0, _ = cosine_top1(unloaded, tome_fx.optimize(unloaded, r=2, example_inputs=x), x)
    assert abs(cos0 - cos) > 1e-4


def test_exported_program_archive(tmp_path, capsys):
    """A .pt2 from torch.export.save. Needs the torch.export capture path of tome_fx."""
    model, x = timm_model(3), cli_inputs()
    torch.export.save(torch.export.export(model, x), tmp_path / "vit.pt2")
    res = run_here(capsys, "report", tmp_path / "vit.pt2", "--r", "2", "--format", "json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    plan = tome_fx.optimize(model, r=2, example_inputs=x).tome
    assert [(b["tokens_in"], b["r"]) for b in data["blocks"]] == [(b.tokens_in, b.r) for b in plan.blocks]
    assert data["protected_tokens"] == 1 and data["input_shape"] == [[2, *SIZE]]


def test_huggingface_directory(tmp_path, capsys):
    """A local directory from save_pretrained. Needs tome_fx to capture HuggingFace ViTs."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=5)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path / "vit")
    capsys.readouterr()  # save_pretrained's progress bar
    res = run_here(capsys, "report", tmp_path / "vit", "--r", "2", "--format", "json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["model_class"] == "ViTForImageClassification"
    # the classifier reads the class token only: the last block computes only it (drop.py)
    assert [(b["tokens_in"], b["tokens_out"]) for b in data["blocks"]] == [(17, 15), (15, 1)]
    assert data["rewrites"]["drop_unread"] == 1
    assert data["protected_tokens"] == 1 and data["fidelity"]["top1_agreement"] is not None


def test_errors_are_one_line(files, capsys):
    timm_src = ("report", f"timm:{NAME}", "--input-size", SIZE_ARG)
    with_tests = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}  # so the pickled class imports
    cases = [
        (("report", files / "missing.pt"), "no such file or directory"),
        (("report", files / "notes.pt"), "not a torch.save file"),
        (("report", files / "untraceable.pt", "--trust-pickle", "--input-size", "8"),
         "cannot trace Untraceable with torch.fx"),
        (("report", files / "untraceable.pt", "--trust-pickle", "--input-size", "8", "--debug"), None),
        ((*timm_src, "--flops-budget", "1.5"), "flops_budget must be in (0, 1]"),
        ((*timm_src, "--flops-budget", "0.01"), "below the smallest reachable FLOP ratio"),
        (("report", f"timm:{NAME}", "--input-size", "3,abc,64"), "--input-size must be"),
        (("report", f"timm:{NAME}", "--input-size", "64,64"), "C,H,W"),
        (("report", "timm:no_such_model"), "cannot build timm model"),
        (("bench", f"timm:{NAME}", "--r", "-1"), "r must be >= 0"),
        (("visualize", f"timm:{NAME}", files / "notes.pt", "-o", files / "x.png"), "cannot read image"),
    ]
    # the console script once (with --debug: the traceback is shown), the rest in this process
    res = run(*cases[3][0], env=with_tests)
    assert res.returncode != 0 and "Traceback" in res.stderr and "CaptureError" in res.stderr
    for args, text in cases[:3] + cases[4:]:
        assert_error(run_here(capsys, *args), text)


@pytest.mark.parametrize("command", ["report", "bench", "sweep", "visualize", "export"])
def test_help_has_an_example(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"tome-fx {command} " in out.split("examples:")[1]


def test_visualize_colours_follow_tracked_sources(files, capsys):
    out = files / "groups.png"
    res = run_here(capsys, "visualize", files / "model.pt", files / "image.png", "-o", out, "--trust-pickle",
              "--r", "4", "--layer", "1", "--scale", "1")
    assert res.returncode == 0, res.stderr
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (64, 64 * 2, 3)  # [image | groups], each the input size at scale 1

    model = torch.load(files / "model.pt", weights_only=False)
    x, _ = load_image(str(files / "image.png"), SIZE, *normalization(model))
    fast = tome_fx.optimize(model, r=4, example_inputs=(x,))
    tracked = track_sources(fast, x)
    groups = group_ids(tracked.at(1)[0], tracked.prefix).reshape(4, 4)
    assert 1 < len(groups.unique()) < 16  # after two merges of 4: 8 groups of 16 patches
    right = img[:, 64:]
    colour = {}
    for i in range(4):
        for j in range(4):
            patch = right[16 * i: 16 * i + 15, 16 * j: 16 * j + 15]  # without the boundary line
            assert (patch == patch[0, 0]).all()
            colour[(i, j)] = tuple(patch[0, 0])
    for p in colour:
        for q in colour:
            assert (colour[p] == colour[q]) == (groups[p] == groups[q]).item(), (p, q)
    assert f"{len(groups.unique())} groups of 16 patches" in res.stdout


def test_bench_command(files, capsys):
    path = files / "bench.json"
    res = run_here(capsys, "bench", f"timm:{NAME}", "--input-size", SIZE_ARG, "--r", "2", "--batch-size", "4",
              "--runs", "2", "--warmup", "1", "--device", "cpu", "--json", path)
    assert res.returncode == 0, res.stderr
    data = json.loads(path.read_text())
    assert data["device"] == "cpu" and data["batch"] == 4 and data["input_shape"] == [4, *SIZE]
    assert data["r"] == tome_fx.optimize(timm_model(0), r=2, example_inputs=cli_inputs()).tome.r
    (row,) = data["results"]
    assert row["mode"] == "eager" and row["original"] > 0 and row["rewritten"] > 0
    assert row["speedup"] == pytest.approx(row["rewritten"] / row["original"])
    assert "eager" in res.stdout and f"wrote {path}" in res.stdout


def test_readme_main_job():
    """The README's main-job command works as written (on the built-in default model)."""
    readme = (ROOT / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if ln.startswith("tome-fx report "))
    budget = float(line.split("--flops-budget")[1].split()[0])
    res = run(*line.split()[1:])
    assert res.returncode == 0, res.stderr
    ratio = float(res.stdout.split("(ratio ")[1].split(",")[0])
    assert budget - 0.01 <= ratio <= budget


# ---------------------------------------------------------------------------------------------
# .pt2 files saved with torch.export's default (static) shapes, text model directories
# ---------------------------------------------------------------------------------------------

def _main(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _tiny_vit():
    torch.manual_seed(0)
    return timm.create_model(NAME, img_size=32, patch_size=8, depth=2, pretrained=False).eval()


@pytest.fixture(scope="module")
def static_pt2(tmp_path_factory):
    """A ViT saved as torch.export saves by default (batch fixed at 2), the same ViT with a
    dynamic batch, and 5 images: batches of 2 leave one over."""
    d = tmp_path_factory.mktemp("static")
    model, x = _tiny_vit(), torch.randn(2, 3, 32, 32)
    torch.export.save(torch.export.export(model, (x,)), d / "static.pt2")
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)), d / "dyn.pt2")
    rng = np.random.default_rng(0)
    np.savez(d / "d.npz", images=rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8),
             labels=np.arange(5))
    return d, model


def test_static_batch_runs_in_batches_of_its_size(static_pt2):
    """The program's own graph bakes batch 2 into its reshapes, so it cannot be re-exported with
    another batch: it runs 2 at a time, the last call padded and trimmed. Exact: equal to the
    module it was exported from, which takes any batch."""
    from tome_fx.graph.batches import InBatches, static_batch

    d, model = static_pt2
    ep, dyn = torch.export.load(d / "static.pt2"), torch.export.load(d / "dyn.pt2")
    assert static_batch(ep) == 2 and static_batch(dyn) is None and static_batch(model) is None
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(InBatches(ep.module(), 2)(x), model(x), rtol=0, atol=1e-5)
    # calibration on 5 inputs runs the captured graph 2 at a time: the same plan and drift as
    # the program with a dynamic batch, which runs all 5 at once
    plans = [tome_fx.plan(p, 0.7, calibration=(x,)) for p in (ep, dyn)]
    assert plans[0].r == plans[1].r and plans[0].drift == pytest.approx(plans[1].drift, abs=1e-6)
    fast = tome_fx.optimize(ep, flops_budget=0.7, calibration=(x,))
    assert static_batch(fast) == 2 and fast.tome.r == plans[0].r


def test_static_batch_pt2_sweep_report_bench(static_pt2, capsys, tmp_path):
    d, _ = static_pt2
    norm = ("--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5")
    code, out, err = _main(capsys, "sweep", d / "static.pt2", "--data", d / "d.npz", *norm,
                           "--calib", "2", "--budgets", "1,0.7", "--strategy", "constant",
                           "--runs", "1", "--warmup", "0", "--json", tmp_path / "s.json")
    assert code == 0, err
    static = json.loads((tmp_path / "s.json").read_text())
    code, _, err = _main(capsys, "sweep", d / "dyn.pt2", "--data", d / "d.npz", *norm,
                         "--calib", "2", "--budgets", "1,0.7", "--strategy", "constant",
                         "--no-throughput", "--json", tmp_path / "d.json")
    assert code == 0, err
    dynamic = json.loads((tmp_path / "d.json").read_text())
    assert static["evaluated"] == 3 and all(r["items_per_s"] > 0 for r in static["rows"])
    for a, b in zip(static["rows"], dynamic["rows"]):
        assert (a["strategy"], a["r"], a["agreement"]) == (b["strategy"], b["r"], b["agreement"])
        assert a["cosine"] == pytest.approx(b["cosine"], abs=1e-6)
    code, out, err = _main(capsys, "report", d / "static.pt2", "--data", d / "d.npz", *norm,
                           "--calib", "3", "--flops-budget", "0.7", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["fidelity"]["samples"] == 2
    for source, calls in (("static.pt2", "3 calls per batch"), ("dyn.pt2", None)):
        code, out, err = _main(capsys, "bench", d / source, "--r", "2", "--batch-size", "5",
                               "--runs", "1", "--warmup", "0", "--device", "cpu")
        assert code == 0, err  # an ExportedProgram's module refuses .eval(): bench must not call it
        assert "batch 5" in out and (calls is None or calls in out)


def _bert_dir(path):
    """A tiny HuggingFace BERT saved with save_pretrained, its WordPiece tokenizer, and 6
    sentences of 5 to 20 words."""
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(40)]
    (path / "vocab.txt").parent.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    cfg = transformers.BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).eval().save_pretrained(path)
    transformers.BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    rng = np.random.default_rng(0)
    lines = [" ".join(f"w{i}" for i in rng.integers(0, 40, size=n)) for n in (5, 9, 20, 12, 7, 15)]
    (path / "s.txt").write_text("\n".join(lines) + "\n")
    return path


def test_text_model_directory_on_the_command_line(tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="ONNX export needs the export extra")
    import onnx

    bert = _bert_dir(tmp_path / "bert")
    capsys.readouterr()  # save_pretrained's progress bar
    hint = "a text model (token ids): pass --seq-len N or --data sentences.txt"
    for extra in ((), ("--input-size", "16")):
        code, _, err = _main(capsys, "export", bert, "-o", tmp_path / "b.onnx", *extra)
        assert code == 2 and hint in err and err.count("\n") == 1, err
    code, out, err = _main(capsys, "export", bert, "-o", tmp_path / "b.onnx", "--seq-len", "16",
                           "--r", "2")
    assert code == 0, err
    assert "dynamic: input_ids[0] (batch), attention_mask[0] (batch), input_ids[1] (sequence)" in out
    model = onnx.load(str(tmp_path / "b.onnx"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input}
    assert dims == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    code, out, err = _main(capsys, "export", bert, "-o", tmp_path / "d.pt2", "--data",
                           bert / "s.txt", "--flops-budget", "0.7")
    assert code == 0 and "FLOP ratio" in out and f"wrote {tmp_path / 'd.pt2'}" in out, err
    assert len(torch.export.load(str(tmp_path / "d.pt2")).graph_signature.user_inputs) == 2
    code, out, err = _main(capsys, "report", bert, "--seq-len", "16", "--r", "2", "--format",
                           "json")
    assert code == 0 and json.loads(out)["input_shape"] == [[2, 16], [2, 16]], err
    code, out, err = _main(capsys, "bench", bert, "--data", bert / "s.txt", "--calib", "2",
                           "--r", "2", "--batch-size", "4", "--runs", "1", "--warmup", "0",
                           "--device", "cpu")
    assert code == 0 and "batch 4" in out, err
    code, _, err = _main(capsys, "report", f"timm:{NAME}", "--input-size", SIZE_ARG,
                         "--seq-len", "8")
    assert code == 2 and "--seq-len is for text models" in err


def test_r_beyond_what_blocks_merge_says_what_was_used(static_pt2, capsys):
    d, model = static_pt2
    code, out, err = _main(capsys, "report", d / "static.pt2", "--r", "500")
    assert code == 0, err
    plan = tome_fx.optimize(model, r=500, example_inputs=torch.randn(2, 3, 32, 32)).tome
    assert plan.r == [8, 0]  # 16 patches: block 0 merges 8; block 1 computes the class token only
    assert out.splitlines()[0].endswith("r = 500 (capped per block: 8 0)")
    assert "--r 500 capped in block(s) 0: a block merges at most half its unprotected tokens" in out


def test_threads_are_set_said_and_recorded(static_pt2, capsys, tmp_path, monkeypatch):
    """--threads N: torch times with N threads (seen inside the timing), the output and the
    JSON say N, and the count is restored after; a load average above the cores is a warning
    in both (none at an idle load)."""
    from tome_fx import timing

    d, _ = static_pt2
    before, seen, interleaved = torch.get_num_threads(), [], timing.interleaved

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return interleaved(*args, **kwargs)

    monkeypatch.setattr(timing, "interleaved", spy)
    quick = ("--runs", "1", "--warmup", "0")
    norm = ("--data", d / "d.npz", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--calib", "2",
            "--budgets", "1,0.7", "--strategy", "constant", *quick)
    cores = timing.cores()
    warning = f"warning: the 1-minute load average is {cores + 3:.1f} on {cores} core(s)"
    for load in (0.0, cores + 3.0):
        monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
        code, out, err = _main(capsys, "bench", d / "dyn.pt2", "--r", "2", "--batch-size", "2",
                               *quick, "--device", "cpu", "--threads", "1",
                               "--json", tmp_path / "b.json")
        assert code == 0, err
        bench = json.loads((tmp_path / "b.json").read_text())
        assert "1 CPU thread(s)" in out and bench["threads"] == 1 and seen[-1] == 1
        assert (warning in out) == (load > 0) and (bench["cpu_warning"] is None) == (load == 0)
        code, out, err = _main(capsys, "sweep", d / "dyn.pt2", *norm, "--threads", "1",
                               "--json", tmp_path / "s.json")
        assert code == 0, err
        swept = json.loads((tmp_path / "s.json").read_text())
        assert "1 CPU thread(s)" in out and swept["threads"] == 1 and set(seen[-2:]) == {1}
        assert (warning in out) == (load > 0) == (warning in swept["throughput_note"])
        assert torch.get_num_threads() == before
    code, out, err = _main(capsys, "bench", d / "dyn.pt2", "--threads", "0")
    assert code == 2 and err == "tome-fx: error: --threads must be >= 1, got 0\n"
