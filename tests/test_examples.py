"""The README's example scripts run as written (with fewer steps): both runs of the protocol."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "script, steps, needs",
    [
        ("plain_loop.py", "30", None),
        ("hf_trainer.py", "5", "transformers"),
        ("lightning_fit.py", "20", "lightning"),
        ("accelerate_loop.py", "24", "accelerate"),
    ],
)
def test_example_runs(script, steps, needs):
    if needs:
        pytest.importorskip(needs, reason=f"the example needs {needs}")
    # a replay that drifts (or fails to end at x*) warns: make that an error here
    cmd = [sys.executable, "-W", "error::RuntimeWarning", os.path.join(ROOT, "examples", script), steps]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "pathgeom/rsi" in res.stdout and "pathgeom/eb" in res.stdout, res.stdout[-2000:]
    if script != "hf_trainer.py":
        assert "final distance ratio ||x_T - x*|| / ||x_0 - x*|| = 0.0" in res.stdout, res.stdout[-2000:]
    else:
        assert "'pathgeom/final_distance_ratio': 0.0" in res.stdout and "Trainer's own log" in res.stdout, res.stdout[-2000:]
