"""The README's example scripts run as written (with fewer steps)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "script, steps, needs",
    [("plain_loop.py", "30", None), ("hf_trainer.py", "4", "transformers"), ("lightning_fit.py", "20", "lightning")],
)
def test_example_runs(script, steps, needs):
    if needs:
        pytest.importorskip(needs, reason=f"the example needs {needs}")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), steps], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "pathgeom/rsi" in res.stdout and "pathgeom/eb" in res.stdout, res.stdout[-2000:]
