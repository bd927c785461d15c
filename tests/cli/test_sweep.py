"""`pathgeom sweep` at tiny sizes: one real two-value learning-rate sweep of the mlp task, its
folders, comparison and summary line checked against the runs' own summaries; bad sweeps refused
before anything runs."""

import io
import json
import os
from contextlib import redirect_stderr, redirect_stdout

import pytest

from pathgeom_fast import cli, sweep

TINY = ["--task", "mlp", "--width", "8", "--steps", "12", "--probe-every", "2", "--probe-batches", "1", "--batch-size", "16",
        "--lags", "none", "--snapshot-every", "0", "--no-cross-seed", "--no-x0-reference", "--threads", "1"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "lr"
    so, se = io.StringIO(), io.StringIO()
    with redirect_stdout(so), redirect_stderr(se):
        rc = cli.main(["sweep", "--lr", "0.02", "0.2", "--out", str(out)] + TINY)
    assert rc == 0, se.getvalue()[-2000:]
    return out, so.getvalue(), se.getvalue()


def _summary(path):
    with open(path) as f:
        return json.load(f)


def test_one_full_run_per_value_then_the_comparison(swept):
    out, stdout, stderr = swept
    assert sorted(os.listdir(out)) == ["compare.json", "compare.md", "compare.png", "lr=0.02", "lr=0.2"]
    runs = _summary(out / "compare.json")["runs"]
    assert [r["label"] for r in runs] == ["lr=0.02", "lr=0.2"]
    assert runs[0]["differs"] == {} and runs[1]["differs"] == {"lr": 0.2}
    for r, lr in zip(runs, (0.02, 0.2)):
        s = _summary(out / f"lr={lr:g}" / "summary.json")
        for name in ("records.csv", "geometry.png", "findings.md", "xstar.safetensors"):
            assert (out / f"lr={lr:g}" / name).is_file()
        assert s["config"]["lr"] == lr and s["config"]["steps"] == 12 and s["config"]["width"] == 8
        assert s["replay_final_distance_ratio"] == 0.0  # each a full two-run measurement
        assert r["mu"] == s["overall"]["full"]["mu"] and r["L"] == s["overall"]["full"]["L"]
        assert r["eta_opt"] == pytest.approx(r["mu"] / r["L"] ** 2, rel=1e-12)
        assert r["final_train_loss"] == s["final_train_loss"]
    assert "sweep lr" in stderr and "2/2" in stderr  # the progress bar over runs, on stderr
    assert "2 runs in" in stdout and str(out / "compare.json") in stdout


def test_summary_line_says_how_far_mu_L_eta_opt_and_loss_move(swept):
    out, stdout, _ = swept
    s = [_summary(out / f"lr={lr}" / "summary.json") for lr in ("0.02", "0.2")]
    mu = [x["overall"]["full"]["mu"] for x in s]
    L = [x["overall"]["full"]["L"] for x in s]
    eta = [m / l**2 for m, l in zip(mu, L)]
    loss = [x["final_train_loss"] for x in s]

    def moves(name, v):
        lo, hi = min(v), max(v)
        return f"{name} {lo:.3g}..{hi:.3g}" + (f" ({hi / lo:.3g}x)" if lo > 0 else " (changes sign)" if hi > 0 else "")

    want = "across lr = 0.02, 0.2: " + "; ".join([moves("mu", mu), moves("L", L), moves("eta_opt", eta), moves("final loss", loss)])
    assert want in stdout.splitlines()


def test_plan_checks_every_run_before_any_starts(tmp_path):
    cfgs = sweep.plan({"task": "resnet", "out": str(tmp_path / "s"), "steps": 5}, "init_scale", [0.5, 2.0])
    assert [(c.init_scale, c.out, c.task, c.steps) for c in cfgs] == [
        (0.5, str(tmp_path / "s" / "init_scale=0.5"), "resnet", 5), (2.0, str(tmp_path / "s" / "init_scale=2"), "resnet", 5)]
    with pytest.raises(ValueError, match="needs at least two values"):
        sweep.plan({"out": "x"}, "lr", [0.1])
    with pytest.raises(ValueError, match="cannot sweep 'lags'"):
        sweep.plan({"out": "x"}, "lags", [1, 2])


@pytest.mark.parametrize("args,message", [
    (["--lr", "0.1", "0.2", "--seed", "0", "1"], "give exactly one setting several values (e.g. --lr 0.01 0.1), got several: --lr, --seed"),
    (["--lr", "0.1"], "give exactly one setting several values (e.g. --lr 0.01 0.1), got none"),
    (["--lr", "0.1", "0.10"], "--lr lists the same value twice: lr=0.1"),
    (["--seed", "0", "1", "--no-skip"], "--no-skip does not apply to the mlp task (its model has no skip connections; it applies to: resnet)"),
])
def test_bad_sweeps_are_one_line_errors_and_run_nothing(args, message, tmp_path, capsys):
    out = tmp_path / "s"
    assert cli.main(["sweep", "--out", str(out), "--quiet"] + args) == 2
    assert capsys.readouterr().err == f"pathgeom sweep: error: {message}\n"
    assert not out.exists()


def test_bad_values_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        cli.main(["sweep", "--lr", "0.1", "-1"])
    assert "argument --lr: must be a finite number above 0, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["sweep", "--optimizer", "sgd", "lion"])
    assert "invalid choice: 'lion'" in capsys.readouterr().err
