"""benchmarks/gpu_check.py runs every step on CPU (``--smoke``), so a GPU session spends its few
minutes measuring, not debugging. The numbers of a smoke run mean nothing."""
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_check_smoke_run_writes_every_section(tmp_path):
    sys.path.insert(0, str(BENCH))
    import gpu_check

    data = gpu_check.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["env"]["device"] == "cpu" and saved["correctness"] and saved["speed"]
    assert {c["form"] for c in data["correctness"]} == {"bias", "fold"}
    assert all(c["ok"] for c in data["correctness"])  # the reference agrees on CPU too
    variants = {s["variant"] for s in data["speed"]}
    assert {"original/eager", "original/compiled", "tome_fx-fold@0.5/compiled",
            "reference@0.5/eager", "tome_fx-bias@0.5/eager"} <= variants
    assert all(data["kernels"][v] for v in variants)  # an attention op was seen in each
    assert data["merge_share"] and 0 < data["merge_share"][0]["full_s"]
    text = (tmp_path / "gpu_check.md").read_text()
    assert "## Correctness" in text and "## Throughput" in text and "Targets" in text
