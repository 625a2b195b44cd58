"""scripts/gpu_check.py in its CPU mode, so the GPU check cannot rot on machines without a GPU: every row
passes or says why it was skipped; a failing row is a row with its error, the others still run, exit 1."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_check.py"
CUDA_ONLY = {"train --nproc 2 (nccl)", "nccl in a one-process torchrun job", "out of memory: one line, exit 7"}
CHECKS = {
    "train, cached features, data.decode pil (2 workers)",
    "train, uncached (augment light): 2 workers",
    "train, cached, data.decode gpu",
    "model.unfreeze 1, amp bf16",
    "model.unfreeze 1, amp fp16 + GradScaler",
    "resume from last.pt",
    "eval",
    "predict",
    "export torchscript",
    "export onnx",
    "decode: per-file Pillow fallback on dirty files",
    "decode: gpu vs pil, prefix outputs",
    *CUDA_ONLY,
}


@pytest.fixture
def gpu_check(monkeypatch):
    """scripts/gpu_check.py imported as a module (in this process: the tiny stand-in, torch imported once)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_cpu_tiny_mode_passes_or_says_why_for_every_row(gpu_check, tmp_path, capsys):
    out = tmp_path / "cpu.json"
    code = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out), "--workdir", str(tmp_path / "work")])
    done = capsys.readouterr()
    assert code == 0, done.err[-4000:]
    body = json.loads(out.read_text())
    assert body["device"] == "cpu" and body["mode"] == "tiny" and body["failed"] == 0
    assert body["device_name"].startswith("CPU: ")
    checks = {row["name"]: row for row in body["checks"]}
    assert set(checks) == CHECKS  # nothing left out silently
    for name in CUDA_ONLY:
        assert checks[name]["status"] == "skipped" and checks[name]["detail"] == "skipped: needs CUDA"
    benchmarks = {row["name"]: row for row in body["benchmarks"]}
    assert len(benchmarks) == 11 and any("torch.compile" in name for name in benchmarks)
    for row in body["checks"] + body["benchmarks"]:  # passed, or skipped with the reason why
        assert row["status"] == "passed" or (
            row["status"] == "skipped" and row["detail"].startswith("skipped: ") and len(row["detail"]) > 15
        ), row
    for row in body["benchmarks"]:
        assert row["status"] == "skipped" or row["value"] > 0, row
    # The table on stdout: the device in the header, one line per row, the count of failures.
    lines = done.out.strip().splitlines()
    assert lines[0].startswith("vggft gpu_check on CPU: ") and lines[-1].startswith("0 failed")
    assert all(any(line.startswith(name) for line in lines) for name in CHECKS | set(benchmarks))


def test_a_failing_row_is_a_row_and_the_exit_status(gpu_check, tmp_path, capsys):
    out = tmp_path / "cpu.json"
    code = gpu_check.main(
        [
            "--device",
            "cpu",
            "--tiny",
            "--no-bench",
            "--out",
            str(out),
            "--only",
            "cached features,eval",
            "--weights",
            str(tmp_path / "missing.pth"),
        ]
    )
    assert code == 1
    rows = {row["name"]: row for row in json.loads(out.read_text())["checks"]}
    failed = rows["train, cached features, data.decode pil (2 workers)"]
    assert failed["status"] == "failed" and failed["detail"].startswith("WeightsError: model.weights:")
    assert "Traceback" in failed["traceback"]
    assert rows["eval"]["detail"] == "skipped: needs the cached run's weights, which did not pass"
    assert rows["predict"]["detail"] == "skipped: not selected (--only)"
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("1 failed")
