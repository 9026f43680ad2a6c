"""The command line, run as a subprocess like a user would."""
import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "tome_fx", *args], capture_output=True, text=True,
                          timeout=300)


def test_report_timm_r():
    res = run("report", "timm:deit_tiny_patch16_224", "--r", "4")
    assert res.returncode == 0, res.stderr
    assert "blocks.11.attn" in res.stdout and "protected prefix tokens: 1" in res.stdout
    assert "'merges': 12" in res.stdout and "cosine" in res.stdout


def test_report_budget():
    res = run("report", "timm:deit_tiny_patch16_224", "--flops-budget", "0.6", "--batch-size", "1")
    assert res.returncode == 0, res.stderr
    ratio = float(res.stdout.split("ratio ")[1].split()[0])
    assert 0.59 <= ratio <= 0.6


def test_errors_are_one_line():
    for args, text in [
        (("report", "timm:no_such_model"), "cannot build timm model"),
        (("report", "timm:deit_tiny_patch16_224", "--flops-budget", "1.5"), "got 1.5"),
        (("report", "model.xyz"), "unsupported model source"),
    ]:
        res = run(*args)
        assert res.returncode == 2
        assert res.stderr.startswith("tome-fx: error:") and text in res.stderr
        assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1
