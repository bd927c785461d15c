"""bench/gpu.sh, the one call of a GPU session, as far as a CPU machine can run it: its dry run
(every step's command, none run) and its decision about a library built beforehand for the
device (bench/gpu_prebuild.sh -> build/gpu-carry/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["version", "error-paths", "crash-probe", "tests", "bench", "e2e", "host", "sync-check", "compiled-kernels",
         "triton-tune"]


def dry_run(tmp_path, carry=None):
    env = dict(os.environ, PYTHON=sys.executable, GPU_CARRY=str(carry or tmp_path / "no-carry"))
    out = tmp_path / "out"
    res = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), "--dry-run", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    return res.stdout, summary, out


def fake_carry(tmp_path, python_suffix: str, torch_version: str, cuda: str | None) -> str:
    carry = tmp_path / "carry"
    carry.mkdir()
    (carry / f"_C{python_suffix}").write_bytes(b"not a library")
    (carry / "_build_info.py").write_text("EXTENSION = True\n")
    (carry / "carry.txt").write_text(f"python 3.12.1 {python_suffix}\ntorch {torch_version} cuda {cuda}\n"
                                     "nvcc Build cuda_13.0\ngit abc1234\narch 9.0\n")
    return str(carry)


def test_dry_run_lists_every_step_and_runs_none(tmp_path):
    stdout, summary, out = dry_run(tmp_path)
    assert "carried build: none" in stdout
    for name in ["build"] + STEPS:
        assert f"== {name}\n" in summary, name
    assert "would run: " in summary and "bench/gpu_e2e.py --out" in summary and "--cases host" in summary
    assert not (out / "gpu-bench.json").exists() and not (out / "gpu.tgz").exists()  # nothing ran


def test_a_matching_carried_build_replaces_the_build(tmp_path):
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    release = torch.__version__.split("+")[0]  # a PyPI release serves the same release with a local tag
    carry = fake_carry(tmp_path, suffix, release, torch.version.cuda)
    stdout, summary, _ = dry_run(tmp_path, carry)
    assert "carried build: usable" in stdout
    assert "== carried\n" in summary and "== build\n" not in summary


def test_a_carried_build_for_another_python_or_torch_is_not_used(tmp_path):
    carry = fake_carry(tmp_path, ".cpython-399-x86_64-linux-gnu.so", "1.0.0", "99.0")
    stdout, summary, _ = dry_run(tmp_path, carry)
    assert "carried build: not used" in stdout
    assert "built for Python 3.12.1" in stdout and "built against torch 1.0.0" in stdout and "CUDA 99.0" in stdout
    assert "== build\n" in summary and "== carried\n" not in summary


def test_triton_tune_sweeps_configurations_correctly(tmp_path):
    """bench/triton_tune.py at test sizes (the interpreter on CPU): every case under every
    configuration asked for gives the reference's numbers, and a best one is named per case."""
    out = tmp_path / "tune.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "triton_tune.py"), "--tiny", "--warps", "2", "8",
                          "--stages", "none", "2", "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    cases = {r["case"] for r in data["rows"]}
    assert len(cases) == 4 and len(data["rows"]) == 4 * 2 * 2
    assert {(r["num_warps"], r["num_stages"]) for r in data["rows"]} == {(2, None), (2, 2), (8, None), (8, 2)}
    assert all(r["ok"] and r["rel_err"] <= 1e-6 and r["ms"] > 0 for r in data["rows"])
    assert set(data["best"]) == cases and "best per case" in res.stdout
