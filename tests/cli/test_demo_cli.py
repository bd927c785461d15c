"""The main job end to end (small settings), the analyze command, and the CLI."""

import json
import math
import subprocess
import sys

import pytest
import torch

import pathgeom_fast as pg
from pathgeom_fast import cli, demo, report
from pathgeom_fast.snapshots import load_snapshot


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    rc = cli.main(["demo", "--out", str(out), "--steps", "30", "--probe-every", "10", "--probe-batches", "3",
                   "--snapshot-every", "10", "--quiet", "--weight-decay", "0.001", "--per-tensor"])
    assert rc == 0
    return out


def test_demo_writes_the_report(demo_dir, capsys):
    for name in ("records.csv", "per_tensor.csv", "summary.json", "geometry.png", "findings.md", "xstar.safetensors",
                 "xstar_seed1.safetensors", "trajectory.json"):
        assert (demo_dir / name).is_file(), name
    assert (demo_dir / "geometry.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    every = report.read_csv(str(demo_dir / "records.csv"))
    # the default task measures against x* (primary), the cross-seed end point and x_0
    assert report.references_of(every) == ["xstar", "xstar_seed1", "x0"]
    rows = [r for r in every if r["reference"] == "xstar"]
    kinds = {r["kind"] for r in rows}
    assert kinds == {"minibatch", "minibatch_wd", "update", "probe", "probe_wd", "full", "full_wd", "lagged"}
    assert {r["kind"] for r in every if r["reference"] != "xstar"} == kinds - {"lagged"}  # lagged: primary only
    assert len([r for r in rows if r["kind"] == "minibatch"]) == 30
    assert len([r for r in rows if r["kind"] == "probe"]) == 3 * 3
    # anchors every 10 steps, the paper's lags that fit in 30 steps
    assert sorted((r["step"], r["sample"]) for r in rows if r["kind"] == "lagged") == [
        (t, k) for t in (0, 10, 20) for k in (1, 2, 5, 10, 20, 50) if t + k < 30]
    summary = json.loads((demo_dir / "summary.json").read_text())
    mb = summary["overall"]["minibatch"]
    assert 0.0 <= mb["share_cos_positive"] <= 1.0
    assert summary["chance_cos"] == pytest.approx(1 / math.sqrt(summary["numel"]))
    assert set(mb["rsi"]) == {"q0", "q5", "q25", "q50", "q75", "q95", "q100"}
    assert mb["rate"] == pytest.approx(1 - mb["mu"] ** 2 / mb["L"] ** 2)
    assert summary["replay_final_distance_ratio"] == 0.0
    assert [s["step"] for s in summary["steps"]["probe"]] == [0, 10, 20]
    assert summary["cross_seed"]["seed"] == 1 and 0 < summary["final_distance_ratios"]["xstar_seed1"]
    assert set(summary["lagged"]) <= {"1", "2", "5", "10", "20"}
    st = summary["step_size"]  # momentum: ||u|| / ||g|| differs from lr but is of its order
    assert st["n"] == 27 and 0 < st["step_per_unit_gradient"]["q50"]
    findings = (demo_dir / "findings.md").read_text()
    assert findings.startswith("# Findings: mlp") and "Cross-seed reference" in findings and "x_0 as the reference" in findings
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:  # scalars went to TensorBoard too
        assert any(p.name.startswith("events.out.tfevents") for p in (demo_dir / "tensorboard").iterdir())
    assert sorted(p.name for p in (demo_dir / "snapshots").iterdir()) == [
        "step_00000000.safetensors", "step_00000010.safetensors", "step_00000020.safetensors", "step_00000030.safetensors"]


def test_demo_numbers_match_independent_fp64(demo_dir):
    """Recompute step 0 and step 7 of run 2 from scratch in fp64 with torch.cat."""
    cfg = demo.DemoConfig(steps=30, weight_decay=0.001)
    X, y = demo.make_data()
    order = demo.batch_order(len(X), cfg)
    xstar = load_snapshot(str(demo_dir / "xstar.safetensors"))[0]
    torch.manual_seed(cfg.seed)
    model = demo.make_model(cfg.model)
    opt = demo.make_optimizer(cfg, model.parameters())
    names = [n for n, _ in model.named_parameters()]
    r = torch.cat([xstar[n].reshape(-1).double() for n in names])
    rows = {(row["step"], row["kind"], row["sample"]): row for row in report.read_csv(str(demo_dir / "records.csv"))
            if row["reference"] == "xstar"}
    for step in range(8):
        for g in opt.param_groups:
            g["lr"] = demo.lr_at(step, cfg)
        loss = demo.loss_fn(model, (X[order[step]], y[order[step]]))
        loss.backward()
        x = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
        gr = torch.cat([p.grad.reshape(-1).double() for p in model.parameters()])
        if step in (0, 7):
            d = x - r
            a, b, c = gr @ d, gr @ gr, d @ d
            row = rows[(step, "minibatch", 0)]
            assert row["a"] == pytest.approx(a.item(), abs=1e-6 * math.sqrt(b * c))
            assert row["b"] == pytest.approx(b.item(), rel=1e-6)
            assert row["c"] == pytest.approx(c.item(), rel=1e-6)
            assert row["rsi"] == pytest.approx((a / c).item(), rel=1e-5)
            assert row["eb"] == pytest.approx(math.sqrt(b / c), rel=1e-5)
            assert row["lr"] == pytest.approx(demo.lr_at(step, cfg))
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_analyze_the_demo_snapshots(demo_dir, tmp_path, capsys):
    out = tmp_path / "an"
    rc = cli.main(["analyze", str(demo_dir / "snapshots"), "--model", "pathgeom_fast.demo:make_model",
                   "--data", "pathgeom_fast.demo:make_data", "--out", str(out), "--probe-batches", "2", "--quiet",
                   "--device", "cpu"])
    assert rc == 0
    used = pg.backend_for("cpu")  # "cpu" with the extension, "torch" without
    assert f"backend: {used} (" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "auto" and summary["backend_used"] == used
    assert json.loads((demo_dir / "summary.json").read_text())["backend_used"] == used
    rows = report.read_csv(str(out / "records.csv"))
    assert sorted({r["step"] for r in rows}) == [0, 10, 20]  # 30 is the reference: not measured against itself
    assert {r["kind"] for r in rows} == {"probe", "full"}
    full = [r for r in rows if r["kind"] == "full"]
    assert len(full) == 3
    # the demo measured the same full-batch gradient at step 10 on the replayed path
    demo_rows = report.read_csv(str(demo_dir / "records.csv"))
    demo_full = next(r for r in demo_rows if r["kind"] == "full" and r["step"] == 10 and r["reference"] == "xstar")
    an_full = next(r for r in full if r["step"] == 10)
    for key in ("a", "b", "c"):
        assert an_full[key] == pytest.approx(demo_full[key], rel=1e-6, abs=1e-9)


def test_cli_help_and_bad_specs(demo_dir, capsys):
    res = subprocess.run([sys.executable, "-m", "pathgeom_fast.cli", "demo", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--probe-batches" in res.stdout and "records.csv" in res.stdout
    assert cli.main(["analyze", str(demo_dir / "snapshots"), "--model", "nocolon", "--data", "a:b"]) == 2
    assert "must look like 'package.module:function'" in capsys.readouterr().err


_NO_EXTENSION = "import torch; torch.__version__ = '0.0.0-other'\nimport sys\nfrom pathgeom_fast import cli\n"


def test_fallback_is_shown_by_demo_and_version(tmp_path):
    """Without the compiled extension (here: built for another torch version), the demo says that
    the torch fallback ran and what it costs, records backend_used "torch", and warns once;
    --version lists the backends and what 'auto' runs."""
    out = tmp_path / "demo"
    code = _NO_EXTENSION + (
        f"sys.exit(cli.main(['demo', '--out', {str(out)!r}, '--steps', '4', '--probe-every', '2', '--probe-batches', '1', "
        "'--snapshot-every', '0', '--lags', 'none', '--no-cross-seed', '--no-x0-reference', '--quiet']))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "backend: torch (pure-torch fallback): compiled extension not loaded" in res.stdout
    assert "slower than the compiled kernel" in res.stdout
    assert res.stderr.count("FallbackWarning: pathgeom_fast: compiled extension not loaded: using the torch fallback") == 1
    assert json.loads((out / "summary.json").read_text())["backend_used"] == "torch"
    res = subprocess.run([sys.executable, "-c", _NO_EXTENSION + "cli.main(['--version'])"], capture_output=True, text=True)
    assert "extension: not loaded" in res.stdout and "backend='auto' runs: torch on CPU tensors" in res.stdout
    assert "fallback: CPU tensors run the torch backend" in res.stdout


def test_a_run_that_goes_non_finite_is_reported_not_crashed(tmp_path, capsys):
    """lr 1e4 blows the MLP up to NaN: the demo still writes every file (the EB panel has nothing
    a log scale could show), says the replay ratio is not a number, and gives no verdict."""
    out = tmp_path / "nan"
    rc = cli.main(["demo", "--out", str(out), "--steps", "20", "--lr", "1e4", "--no-cross-seed", "--probe-every", "10",
                   "--probe-batches", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "final train loss nan" in text and "not a replay (the run went non-finite)" in text
    for name in ("records.csv", "summary.json", "geometry.png", "findings.md"):
        assert (out / name).stat().st_size > 0, name
    findings = (out / "findings.md").read_text()
    assert "**holds**" not in findings and "**does not hold here**" not in findings and "**no verdict**" in findings
    assert "not a replay (NaN)" in findings
