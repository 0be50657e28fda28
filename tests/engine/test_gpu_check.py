"""tools/gpu_check.py stays runnable: its --dry-run takes every path (trainer step in fp32 / bf16 / fp16
with GradScaler, NCHW and channels-last, eval, ONNX) on the CPU; the loss check flags a drifting precision."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.py"


def _load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check_tool", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_measures_every_variant_and_passes(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    env.pop("DFINE_ORIG_DIR", None)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads(out.read_text())}
    for precision in ("fp32", "bf16", "fp16"):
        for layout in ("nchw", "channels-last"):
            values = rows[f"QUICKSTART train {precision} {layout}"]["values"]
            assert values["img/s"] > 0 and values["first loss"] > 0
            if precision != "fp32":
                assert values["vs fp32"] < 0.05
    assert "skipped" in rows["QUICKSTART train * compile"]["values"]
    for precision in ("fp32", "fp16"):
        assert rows[f"QUICKSTART eval {precision}"]["values"]["latency ms"] > 0
    onnx = rows["QUICKSTART ONNX"]
    assert onnx["problem"] == "" and ("max difference" in onnx["values"] or "skipped" in onnx["values"])
    assert "0 problem(s)" in result.stdout


def test_a_precision_whose_loss_drifts_from_fp32_is_flagged() -> None:
    tool = _load_tool()
    rows = [
        tool.Row("train", "N train fp32 nchw", {"first loss": 10.0}),
        tool.Row("train", "N train bf16 nchw", {"first loss": 10.3}),
        tool.Row("train", "N train fp16 nchw", {"first loss": 11.0}),
        tool.Row("train", "N train fp32 channels-last", {"first loss": 10.0}),
        tool.Row("train", "N train fp16 channels-last", {"first loss": 10.01}),
    ]
    tool.check_losses(rows, tolerance=0.05)
    problems = {row.name: row.problem for row in rows}
    assert problems["N train fp16 nchw"].startswith("first loss 10.0% from fp32")
    assert problems["N train bf16 nchw"] == problems["N train fp16 channels-last"] == ""
    assert rows[1].values["vs fp32"] == pytest.approx(0.03)
    assert rows[4].values["vs fp32"] == pytest.approx(0.001)


def test_without_cuda_and_without_dry_run_it_says_how_to_check_on_a_cpu(
    capsys: pytest.CaptureFixture[str],
) -> None:
    tool = _load_tool()
    if tool.torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert tool.main([]) == 2
    assert "--dry-run" in capsys.readouterr().out
