"""The benchmark scripts run (in quick mode) so they cannot rot; their figures are not asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def test_throughput_benchmark_quick_mode_runs():
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--quick"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for row in ("ResNet-18 @224", "packed store, ONNX Runtime", "PNG folder, torch", "% of limit", "the whole Kaggle set"):
        assert row in result.stdout


def test_startup_benchmark_runs():
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "startup.py"), "--repeats", "1"],
        capture_output=True, text=True, timeout=600, cwd=REPO / "benchmarks",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for row in ("python -c pass (baseline)", "histoscreen --help", "predict (1 patch, ONNX)", "target one-patch predict"):
        assert row in result.stdout


def test_explanations_benchmark_quick_mode_runs():
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "explanations.py"), "--quick"],
        capture_output=True, text=True, timeout=600, cwd=REPO / "benchmarks",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for row in ("Grad-CAM, last stage (7 x 7)", "occlusion, 10 px squares, stride 5", "SYNTHETIC", "ring hidden"):
        assert row in result.stdout


HELPERS = {"measure.py", "model_card.py"}  # imported by the scripts, not run


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "benchmarks").glob("*.py") if p.name not in HELPERS))
def test_every_benchmark_script_imports_and_explains_itself(script):
    """Run from the repository root, as the README says: each script's imports resolve (the
    package and its sibling scripts, with no sys.path edits) and it answers --help."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--help"], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-2000:]


def test_the_accuracy_ceiling_is_the_best_accuracy_of_any_threshold(monkeypatch):
    """cv_ceiling's oracle, which the model card prints as the bound on every threshold rule,
    against trying every threshold, on scores with many ties (tied patches are called together)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from cv_ceiling import best_accuracy

    rng = np.random.default_rng(0)
    for _ in range(300):
        size = int(rng.integers(1, 40))
        labels, scores = rng.integers(0, 2, size), rng.integers(0, 5, size).astype(float)
        tried = max(((scores >= threshold) == labels).mean() for threshold in [*scores, np.inf])
        assert best_accuracy(labels, scores) == pytest.approx(tried)
