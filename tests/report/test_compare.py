"""`pathgeom compare` on four real tiny demo runs (cnn, cnn without BatchNorm, resnet without skip
connections, mlp with init scale 3): every number of compare.json recomputed independently from
each run's own summary.json and records.csv by the formulas."""

import json
import math
import re

import numpy as np
import pytest
import torch

from pathgeom_fast import cli, compare, report

TINY = ["--steps", "14", "--probe-every", "2", "--probe-batches", "1", "--batch-size", "16", "--lags", "none",
        "--snapshot-every", "2", "--no-cross-seed", "--no-x0-reference", "--quiet", "--threads", "1"]
RUNS = {
    "cnn": ["--task", "cnn", "--width", "4"],
    "cnn-nobn": ["--task", "cnn", "--width", "4", "--no-batchnorm"],
    "resnet-noskip": ["--task", "resnet", "--width", "4", "--no-skip"],
    "mlp-init3": ["--task", "mlp", "--width", "16", "--init-scale", "3"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    dirs = []
    for name, args in RUNS.items():
        out = root / name
        assert cli.main(["demo", "--out", str(out)] + args + TINY) == 0
        dirs.append(out)
    out = root / "compared"
    assert cli.main(["compare"] + [str(d) for d in dirs] + ["--out", str(out)]) == 0
    return dirs, out, json.loads((out / "compare.json").read_text())


def _summary(d):
    return json.loads((d / "summary.json").read_text())


def _full_rows(d, summary):
    cut = summary["overall_steps_below"]
    return [r for r in report.read_csv(str(d / "records.csv")) if r["kind"] == "full" and r["reference"] == "xstar"
            and r["step"] < cut]


def test_writes_three_files_one_entry_per_run(runs):
    dirs, out, res = runs
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["label"] for r in res["runs"]] == list(RUNS)
    assert [r["dir"] for r in res["runs"]] == [str(d) for d in dirs]
    assert [r["task"] for r in res["runs"]] == ["cnn", "cnn", "resnet", "mlp"]
    assert res["runs"][0]["differs"] == {}
    assert res["runs"][1]["differs"] == {"batchnorm": False}
    assert res["runs"][2]["differs"] == {"task": "resnet", "skip": False}
    assert res["runs"][3]["differs"] == {"task": "mlp", "width": 16, "init_scale": 3.0}
    for r, d in zip(res["runs"], dirs):
        s = _summary(d)
        assert r["numel"] == s["numel"] and r["final_train_loss"] == s["final_train_loss"]
        assert r["final_train_accuracy"] == s["final_train_accuracy"]


def test_mu_L_eta_rate_are_each_runs_own_by_the_formulas(runs):
    dirs, _, res = runs
    for r, d in zip(res["runs"], dirs):
        s = _summary(d)
        assert r["kind"] == "full"
        assert r["mu"] == s["overall"]["full"]["mu"] and r["L"] == s["overall"]["full"]["L"]
        rows = _full_rows(d, s)  # independently: min RSI and max EB of the full-batch rows of the body
        assert len(rows) >= 5
        assert r["mu"] == pytest.approx(min(x["rsi"] for x in rows), rel=1e-12)
        assert r["L"] == pytest.approx(max(x["eb"] for x in rows), rel=1e-12)
        mu, L = r["mu"], r["L"]
        assert r["eta_opt"] == pytest.approx(mu / L**2, rel=1e-12)
        assert r["rate_opt"] == pytest.approx(1 - mu**2 / L**2, rel=1e-12)
        assert r["rate_opt"] == pytest.approx(s["overall"]["full"]["rate"], rel=1e-12)
        assert r["rsi_median"] == pytest.approx(float(np.median([x["rsi"] for x in rows])), rel=1e-9)
        assert r["eb_median"] == pytest.approx(float(np.median([x["eb"] for x in rows])), rel=1e-9)


def test_learning_rates_factors_cosine_and_contraction(runs):
    dirs, _, res = runs
    for r, d in zip(res["runs"], dirs):
        s = _summary(d)
        cut = s["overall_steps_below"]
        mb = sorted((x for x in report.read_csv(str(d / "records.csv")) if x["kind"] == "minibatch" and x["reference"] == "xstar"),
                    key=lambda x: x["step"])
        lrs = [x["lr"] for x in mb if x["step"] < cut]
        assert r["lr"]["peak"] == pytest.approx(max(lrs)) and r["lr"]["configured"] == s["config"]["lr"]
        assert r["lr"]["median"] == pytest.approx(float(np.median(lrs)))
        mu, L, eta = r["mu"], r["L"], r["lr"]["peak"]
        assert r["factor_at_peak_lr"] == pytest.approx(1 - 2 * eta * mu + eta**2 * L**2, rel=1e-12)
        assert r["lr_over_eta_opt"] == (pytest.approx(eta * L**2 / mu, rel=1e-12) if mu > 0 else None)
        step = s["step_size"]["step_per_unit_gradient"]["q50"]
        assert r["factor_at_step_taken"] == pytest.approx(1 - 2 * step * mu + step**2 * L**2, rel=1e-12)
        assert r["cos_median"] == pytest.approx(float(np.median([x["cos"] for x in mb if x["step"] < cut])), rel=1e-9)
        assert r["cos_over_chance"] == pytest.approx(r["cos_median"] * math.sqrt(r["numel"]), rel=1e-9)
        c = [x["c"] for x in mb]  # one minibatch row per step: consecutive steps
        assert [x["step"] for x in mb] == list(range(len(mb)))
        ratios = [c[t + 1] / c[t] for t in range(len(c) - 1) if t + 1 < cut]
        assert r["median_contraction"] == pytest.approx(float(np.median(ratios)), rel=1e-9)
        # the envelope: ||x_0 - x*||^2 times the implied factors at the lr of each step before the end of the body
        end = max(t for t in range(len(mb)) if t < cut)
        env = c[0] * math.prod(1 - 2 * mb[t]["lr"] * mu + mb[t]["lr"] ** 2 * L**2 for t in range(end))
        assert r["end_of_body_step"] == end
        assert r["envelope_end_of_body"] == pytest.approx(math.sqrt(env), rel=1e-9)
        assert r["distance_end_of_body"] == pytest.approx(math.sqrt(c[end]), rel=1e-12)


def test_batchnorm_ablation_changes_D_by_the_affine_parameters(runs):
    dirs, _, res = runs
    from pathgeom_fast import tasks

    bn = sum(p.numel() for m in tasks.TASK_SPECS["cnn"].model({"width": 4}).modules()
             if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters())
    assert bn == 2 * (4 + 8)
    assert res["runs"][0]["numel"] - res["runs"][1]["numel"] == bn


def _verdicts(findings_md):
    return re.findall(r"^\| \d \| .* \| \*\*([^*]+)\*\* \|$", findings_md, re.M)


def test_markdown_table_sentences_and_claims(runs):
    dirs, out, res = runs
    md = (out / "compare.md").read_text()
    base, nobn = res["runs"][0], res["runs"][1]
    for r in res["runs"]:
        assert f"| {r['label']} | {r['task']} |" in md
    g = compare._g
    assert (f"Without BatchNorm (cnn-nobn vs cnn) the full-batch RSI median is {g(nobn['rsi_median'])} vs "
            f"{g(base['rsi_median'])} (mu {g(nobn['mu'])} vs {g(base['mu'])}); EB median {g(nobn['eb_median'])} vs "
            f"{g(base['eb_median'])}") in md
    assert f"cnn: the learning rate used (peak {g(base['lr']['peak'])}) is " in md
    if base["mu"] > 0:
        assert f"{g(base['lr_over_eta_opt'])} x eta_opt = {g(base['eta_opt'])}" in md
    # the claims side by side: each run's verdicts are those of its own findings.md
    table = re.findall(r"^\| (\d) \| [^|]+ \| (.*) \|$", md.split("## The claims")[1], re.M)
    assert [t[0] for t in table] == ["1", "2", "3", "4", "5"]
    for j, d in enumerate(dirs):
        own = _verdicts((d / "findings.md").read_text())
        assert len(own) == 5
        assert [t[1].split(" | ")[j].strip("*") for t in table] == own
        assert [c["verdict"] for c in res["runs"][j]["claims"]] == own


def test_bad_run_folders_are_one_line_errors(runs, tmp_path, capsys):
    dirs, _, _ = runs
    assert cli.main(["compare", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"pathgeom compare: error: run folder {str(tmp_path / 'nope')!r} does not exist"
    (tmp_path / "empty").mkdir()
    assert cli.main(["compare", str(dirs[0]), str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "has no summary.json or records.csv" in err and err.count("\n") == 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text("{")
    (tmp_path / "bad" / "records.csv").write_text("")
    assert cli.main(["compare", str(tmp_path / "bad"), "--out", str(tmp_path / "o")]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    assert cli.main(["compare", str(dirs[0]), "--labels", "a", "b", "--out", str(tmp_path / "o")]) == 2
    assert "2 labels for 1 runs" in capsys.readouterr().err


def test_an_analyze_folder_compares_beside_a_demo_run(runs, tmp_path, monkeypatch):
    """pathgeom analyze's output (no config, no minibatch rows, lr from the checkpoints) reads too."""
    dirs, _, _ = runs
    an = tmp_path / "an"
    (tmp_path / "cnn4.py").write_text("from pathgeom_fast import tasks\n\n\ndef model():\n"
                                      "    return tasks.TASK_SPECS['cnn'].model({'width': 4})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["analyze", str(dirs[0] / "snapshots"), "--model", "cnn4:model", "--data",
                     "pathgeom_fast.tasks:digits_data", "--out", str(an), "--probe-batches", "1", "--quiet", "--device",
                     "cpu"]) == 0
    res = compare.compare_runs([str(dirs[0]), str(an)], str(tmp_path / "c"))
    r, s = res["runs"][1], json.loads((an / "summary.json").read_text())
    assert r["task"] == "analyze" and r["numel"] == s["numel"] and r["final_train_loss"] is None
    assert r["mu"] == s["overall"]["full"]["mu"] and r["L"] == s["overall"]["full"]["L"]
    assert r["eta_opt"] == pytest.approx(r["mu"] / r["L"] ** 2, rel=1e-12)
    full = sorted((x for x in report.read_csv(str(an / "records.csv")) if x["kind"] == "full"), key=lambda x: x["step"])
    assert r["lr"]["peak"] == pytest.approx(max(x["lr"] for x in full if x["step"] < s["overall_steps_below"]))
    gaps = [(full[i + 1]["c"] / full[i]["c"]) ** (1 / (full[i + 1]["step"] - full[i]["step"])) for i in range(len(full) - 1)
            if full[i + 1]["step"] < s["overall_steps_below"]]
    assert r["median_contraction"] == pytest.approx(float(np.median(gaps)), rel=1e-9)
    assert r["cos_median"] is None  # no minibatch rows in an analysis
    assert "| an | analyze |" in (tmp_path / "c" / "compare.md").read_text()
