"""tome_fx.export: ONNX (checked with onnxruntime) and .pt2 (loaded where tome_fx cannot be
imported) of rewritten models, dynamic dimensions, and the refusals (data-dependent token
counts, a missing extra, an unknown suffix)."""
import functools
import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import tome_fx
from tome_fx import cli, export_files, exporting
from cases import timm_model
from models import TinyTransformer

ort = pytest.importorskip("onnxruntime", reason="ONNX export needs the export extra")
T = pytest.importorskip("transformers", reason="the HuggingFace cases need transformers (dev extra)")

TOL = 1e-4
SMALL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128)


def _images(size):
    return lambda b: (torch.randn(b, 3, size, size),)


def _bert_inputs(batch):
    """Token ids and a padding mask: one sample padded after 18 tokens, and (batch 3) one whose
    only non-protected real token is in set A with no real partner in set B: it merges none
    of its real tokens, while the others merge by their own counts."""
    ids = torch.randint(0, 100, (batch, 24))
    mask = torch.ones(batch, 24, dtype=torch.long)
    mask[1, 18:] = 0
    if batch > 2:
        mask[2, 1:] = 0
        mask[2, 2] = 1
    return {"input_ids": ids, "attention_mask": mask}


# name -> (model, inputs(batch), optimize keyword arguments)
MODELS = {
    "deit_tiny_distilled_patch16_224-d4-96px": (
        lambda: timm_model("deit_tiny_distilled_patch16_224", depth=4, img_size=96), _images(96),
        dict(flops_budget=0.5)),
    "hf_vit": (
        lambda: T.ViTForImageClassification(
            T.ViTConfig(**SMALL, image_size=64, patch_size=8, num_labels=10)).eval(),
        _images(64), dict(flops_budget=0.5)),
    "hf_bert_padding_mask": (
        lambda: T.BertForSequenceClassification(
            T.BertConfig(**SMALL, vocab_size=100, num_labels=3)).eval(),
        _bert_inputs, dict(r=[11, 4, 4, 0])),  # block 0 merges every pair its groups allow
}


def _inputs(name, batch):
    torch.manual_seed(10 + batch)
    return MODELS[name][1](batch)


def _call(module, inputs):
    with torch.no_grad():
        out = module(**inputs) if isinstance(inputs, dict) else module(*inputs)
    return exporting.plain(out)


@functools.lru_cache(maxsize=None)
def _fast(name):
    torch.manual_seed(0)
    model = MODELS[name][0]().eval()
    fast = tome_fx.optimize(model, example_inputs=_inputs(name, 2), **MODELS[name][2])
    assert sum(fast.tome.r) > 0  # a rewritten model, merges in the graph
    return fast


def _tensors(out):
    return export_files.output_tensors(out)


def _ort_run(path, names, inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    values = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    feed = {n: v.numpy() for n, v in zip(names, values) if n in {i.name for i in session.get_inputs()}}
    return session, [torch.from_numpy(o) for o in session.run(None, feed)]


def _merged_per_call(module, inputs):
    """(r asked, tokens each sample loses) of each merge while ``module`` runs ``inputs``."""
    from tome_fx.kernels import tome as kernel

    calls, match = [], kernel.match_tokens

    def spy(n, keys, r, *args):
        plan = match(n, keys, r, *args)
        calls.append((r, 0 if plan is None else plan[1].shape[1]))
        return plan

    kernel.match_tokens = spy
    try:
        _call(module, inputs)
    finally:
        kernel.match_tokens = match
    return calls


def _max_diff(got, want):
    assert len(got) == len(want)
    return max((g - w).abs().max().item() for g, w in zip(got, want))


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_matches_the_rewritten_module(name, tmp_path):
    """DeiT distilled, HF ViT, HF BERT with a padding mask (ViT-S/16: full size, below)."""
    fast = _fast(name)
    path = tmp_path / "fast.onnx"
    result = tome_fx.export(fast, path, verbose=False)  # example inputs: what optimize captured
    assert path.exists() and result.format == "onnx"
    assert list(result.max_diff)[:2] == ["batch 2", "batch 3"]
    if name.startswith("hf_bert"):  # the sequence length is dynamic too: one token fewer runs
        assert list(result.max_diff)[2:] == ["input_ids[1]=23"]
    assert max(result.max_diff.values()) <= TOL
    # independently: onnxruntime at a batch size and inputs export never saw
    inputs = _inputs(name, 3)
    session, got = _ort_run(path, result.inputs, inputs)
    assert _max_diff(got, _tensors(_call(fast, inputs))) <= TOL
    if name == "hf_bert_padding_mask":  # 11 asked; sample 2 merges none of its 2 real tokens,
        assert _merged_per_call(fast, inputs)[0] == (11, 11)  # its padding fills the batch
    assert all(isinstance(i.shape[0], str) for i in session.get_inputs())  # batch is symbolic
    if name.startswith("hf_bert"):  # named, not torch.export's symbols (s95)
        assert {i.name: i.shape for i in session.get_inputs()} == {
            "input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    assert result.outputs == (("logits",) if name.startswith("hf") else ("output",))


@pytest.mark.slow
def test_onnx_full_size_vit_small(tmp_path):
    """The issue's model at full size: vit_small_patch16_224 at flops_budget=0.5."""
    model = timm_model("vit_small_patch16_224")
    torch.manual_seed(1)
    fast = tome_fx.optimize(model, flops_budget=0.5, strategy="constant",
                            example_inputs=torch.randn(2, 3, 224, 224))
    assert fast.tome.ratio <= 0.5
    result = tome_fx.export(fast, tmp_path / "vit_s.onnx", verbose=False)
    assert result.dynamic == ("x[0]",) and max(result.max_diff.values()) <= TOL
    x = torch.randn(4, 3, 224, 224)
    _, got = _ort_run(tmp_path / "vit_s.onnx", ["x"], (x,))
    assert _max_diff(got, _tensors(_call(fast, (x,)))) <= TOL


LOAD_WITHOUT_TOME_FX = textwrap.dedent("""
    import json, sys
    sys.modules["tome_fx"] = None  # an installed or path-reachable tome_fx cannot be imported
    try:
        import tome_fx
        sys.exit("tome_fx was importable")
    except ImportError:
        pass
    import torch
    cases, report = torch.load(sys.argv[1]), {}
    for name, (path, args, kwargs) in cases.items():
        out = torch.export.load(path).module()(*args, **kwargs)
        torch.save(out, path + ".out")
        report[name] = sorted(m for m in sys.modules if m.split(".")[0] in ("tome_fx", "transformers")
                              and sys.modules[m] is not None)
    print(json.dumps(report))
""")


def test_pt2_loads_and_runs_where_tome_fx_cannot_be_imported(tmp_path):
    cases, expected = {}, {}
    for name in ("deit_tiny_distilled_patch16_224-d4-96px", "hf_bert_padding_mask"):
        fast, path = _fast(name), str(tmp_path / f"{name}.pt2")
        result = tome_fx.export(fast, path, verbose=False)
        assert max(result.max_diff.values()) <= TOL and "batch 3" in result.max_diff
        inputs = _inputs(name, 3)
        values = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
        cases[name] = (path, values, {})
        expected[name] = _tensors(_call(fast, inputs))
        assert exporting._foreign_calls(fast)  # the rewritten module itself calls the kernels
    torch.save(cases, tmp_path / "cases.pt")
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITHOUT_TOME_FX)
    # -I: no PYTHONPATH, no user site, not the current directory
    res = subprocess.run([sys.executable, "-I", str(script), str(tmp_path / "cases.pt")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    imported = json.loads(res.stdout.strip().splitlines()[-1])
    assert imported == {name: [] for name in cases}  # neither tome_fx nor transformers
    for name, want in expected.items():
        got = _tensors(torch.load(cases[name][0] + ".out"))
        assert _max_diff(got, want) <= TOL, name


def test_token_dimension_is_dynamic_where_the_module_allows_it(tmp_path):
    """A hand-written encoder over [B, N, 16] tokens (no position table): the token count is
    dynamic too, and the ONNX model follows the module at token counts it was not exported at.
    timm ViTs (a position table) keep the image size static (test above: only x[0])."""
    torch.manual_seed(0)
    model = TinyTransformer(depth=2).eval()
    fast = tome_fx.optimize(model, r=4, example_inputs=torch.randn(2, 32, 16))
    result = tome_fx.export(fast, tmp_path / "t.onnx", verbose=False)
    assert result.dynamic == ("x[0]", "x[1]") and "x[1]=31" in result.max_diff
    session = ort.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"])
    # the file's dimensions are named (torch.export's own symbols would be s95, s85)
    assert result.axes == ("batch", "sequence") and str(result).endswith(
        "dynamic: x[0] (batch), x[1] (sequence)")
    assert session.get_inputs()[0].shape[:2] == ["batch", "sequence"]
    assert session.get_outputs()[0].shape[0] == "batch"
    for n in (28, 40):
        x = torch.randn(3, n, 16)
        got = [torch.from_numpy(o) for o in session.run(None, {"x": x.numpy()})]
        assert _max_diff(got, _tensors(_call(fast, (x,)))) <= TOL


def test_token_count_derived_from_the_input_stays_dynamic_at_either_parity(tmp_path):
    """wav2vec2's token count is a floor division of the raw length: the file must accept
    lengths giving an odd and an even count (matmul's decomposition guarded on the A/B views'
    parity, so the exported program refused every other length with a raw guard failure)."""
    torch.manual_seed(0)
    model = T.Wav2Vec2Model(T.Wav2Vec2Config(
        **{**SMALL, "num_hidden_layers": 1}, conv_dim=(32, 32), conv_stride=(5, 2),
        conv_kernel=(10, 3), num_feat_extract_layers=2, num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4)).eval()
    fast = tome_fx.optimize(model, r=20, example_inputs=(torch.randn(2, 4000),))
    result = tome_fx.export(fast, tmp_path / "w.pt2", verbose=False)
    assert result.dynamic == ("input_values[0]", "input_values[1]")
    program = torch.export.load(tmp_path / "w.pt2").module()
    for length in (3000, 3020):  # 299 and 300 tokens
        x = torch.randn(1, length)
        got = _tensors(_call(program, (x,)))
        assert _max_diff(got, _tensors(_call(fast, (x,)))) <= TOL


def test_a_file_refusing_a_size_it_calls_dynamic_is_traced_less_dynamic(monkeypatch, tmp_path):
    """Where the written program's own guards refuse a size its range admits, export traces
    again with that dimension static and says so, rather than passing on the guard failure."""
    torch.manual_seed(0)
    fast = tome_fx.optimize(TinyTransformer(depth=2).eval(), r=4,
                            example_inputs=torch.randn(2, 32, 16))
    load = exporting.load_runner

    def strict(path, fmt, names):
        run = load(path, fmt, names)

        def guarded(tensors):
            if tensors[0].shape[1] != 32:
                raise AssertionError("Guard failed: x.size()[1] % 2 == 0")
            return run(tensors)
        return guarded

    monkeypatch.setattr(exporting, "load_runner", strict)
    result = tome_fx.export(fast, tmp_path / "t.pt2", verbose=False)
    assert result.dynamic == ("x[0]",) and set(result.max_diff) == {"batch 2", "batch 3"}
    assert max(result.max_diff.values()) <= TOL
    assert "refused x[1]=31 (Guard failed: x.size()[1] % 2 == 0)" in result.notes[0]


def test_data_dependent_token_count_is_refused(tmp_path):
    model = timm_model("vit_tiny_patch16_224", depth=2, img_size=64)
    fast = tome_fx.optimize(model, method="tomato", sim_threshold=0.02,
                            example_inputs=torch.randn(2, 3, 64, 64))
    with pytest.raises(tome_fx.ExportError) as exc:
        tome_fx.export(fast, tmp_path / "t.pt2", verbose=False)
    msg = str(exc.value)
    assert "\n" not in msg and "depends on the input's values" in msg
    assert "kernels/tomato.py" in msg and "threshold mode" in msg
    assert not (tmp_path / "t.pt2").exists()


def test_missing_extra_is_named(monkeypatch, tmp_path, capsys):
    fast = _fast("deit_tiny_distilled_patch16_224-d4-96px")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(ModuleNotFoundError) as exc:
        tome_fx.export(fast, tmp_path / "m.onnx")
    assert isinstance(exc.value, tome_fx.MissingExtraError)
    assert str(exc.value) == ('ONNX export needs onnx, onnxscript and onnxruntime (onnxruntime '
                              'missing): pip install -e ".[export]"')
    assert not (tmp_path / "m.onnx").exists()
    # the command line says the same in one line, before loading the model
    assert cli.main(["export", "timm:no_such_model", "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tome-fx: error: ONNX export needs") and err.count("\n") == 1


def test_format_follows_the_suffix():
    assert exporting.export_format("a/fast.onnx") == "onnx"
    assert exporting.export_format("fast.PT2") == "pt2"
    assert exporting.export_format("fast", "pt2") == "pt2"
    for path, fmt in (("fast.onx", None), ("fast.onnx", "pt2"), ("fast.pt2", "tflite")):
        with pytest.raises(ValueError):
            exporting.export_format(path, fmt)


def _tiny_vit():
    model = timm_model("vit_tiny_patch16_224", depth=2, img_size=32)
    return tome_fx.optimize(model, r=1, example_inputs=torch.randn(2, 3, 32, 32))


def test_mismatch_above_the_tolerance_is_an_error(monkeypatch, tmp_path):
    """The check can fail: a file whose outputs are off by 1e-3 is an ExportError."""
    fast = _tiny_vit()
    load = export_files.load_runner
    monkeypatch.setattr(exporting, "load_runner",
                        lambda *a: lambda t: [o + 1e-3 for o in load(*a)(t)])
    with pytest.raises(tome_fx.ExportError, match="differ from the module's by 0.001"):
        tome_fx.export(fast, tmp_path / "t.pt2", verbose=False)


def test_training_mode_is_kept_and_eval_is_exported(tmp_path):
    fast = _tiny_vit().train()
    result = tome_fx.export(fast, tmp_path / "t.pt2", verbose=False)
    assert fast.training and all(m.training for m in fast.modules())
    assert max(result.max_diff.values()) == 0.0


def test_cli_export(tmp_path, capsys):
    out = tmp_path / "vit.pt2"
    args = ["export", "timm:vit_tiny_patch16_224", "--input-size", "3,32,32", "--r", "1"]
    assert cli.main([*args, "-o", str(out)]) == 0
    assert out.exists() and torch.export.load(str(out)) is not None
    printed = capsys.readouterr().out
    line = next(s for s in printed.splitlines() if s.startswith(f"wrote {out}"))
    diffs = [float(d) for d in re.findall(r"([-+.e0-9]+) at batch \d+", line)]
    assert len(diffs) == 2 and max(diffs) <= TOL and line.endswith("dynamic: x[0] (batch)")
    assert cli.main([*args, "-o", str(tmp_path / "m.tflite")]) == 2
    err = capsys.readouterr().err
    assert err == ("tome-fx: error: cannot tell the export format from "
                   f"'{tmp_path / 'm.tflite'}': the file name must end in .onnx or .pt2\n")
