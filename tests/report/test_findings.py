"""findings.md and the summaries: no verdict from too few or non-finite rows, undefined rows
counted and named, wording that fits the producer, 'no guarantee' where mu <= 0."""

import json
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F

from pathgeom_fast import report
from pathgeom_fast.findings import MIN_VERDICT_STEPS, findings_markdown
from pathgeom_fast.integrations import StepMeasurer
from pathgeom_fast.tracker import PathTracker, Reference

VERDICTS = re.compile(r"\*\*(holds|does not hold here|not measured|no verdict)\*\*")


def _row(step, kind, a, b, c, sample=0, ref="xstar"):
    def div(x, y):
        if y != 0:
            return x / y
        return math.nan if x == 0 or math.isnan(x) else math.copysign(math.inf, x)

    rsi = div(a, c)
    eb = math.sqrt(div(b, c)) if not (b < 0 or c < 0) else math.nan
    cos = div(a, math.sqrt(b * c)) if b * c > 0 else math.nan
    return {"step": step, "kind": kind, "sample": sample, "reference": ref, "lr": 0.1, "loss": 1.0,
            "rsi": rsi, "eb": eb, "cos": cos, "eta_star": div(a, b), "a": a, "b": b, "c": c}


def _records(steps, seed=0, bad=None, cos_lo=0.1):
    """minibatch and full rows with random positive-cosine (a, b, c); ``bad``: {step: value} puts
    that value (nan or inf) into a, b and c of that step's rows."""
    rnd = random.Random(seed)
    rows = []
    for step in range(steps):
        c = 2.0 * 0.97 ** step
        for kind in ("minibatch", "full", "update"):
            b = rnd.uniform(0.5, 2.0)
            a = rnd.uniform(cos_lo, 0.9) * math.sqrt(b * c)
            if bad and step in bad:
                a = b = c_ = bad[step]
            else:
                c_ = c
            rows.append(_row(step, kind, a, b, c_))
    return rows


def _claims(md):
    return [line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]


def test_summary_counts_and_names_undefined_rows_against_an_independent_count():
    rows = _records(9, bad={4: math.nan, 5: math.nan, 6: math.nan, 7: math.nan, 8: math.nan})
    s = report.summarize(rows, 1000, tail_fraction=0)
    mb = s["overall"]["minibatch"]
    mine = [r for r in rows if r["kind"] == "minibatch"]
    finite = [r for r in mine if all(math.isfinite(r[k]) for k in ("a", "b", "c"))]
    assert mb["n"] == 9 and mb["n_undefined"] == 5 and mb["n_nonfinite"] == 5 and mb["n_cos"] == 4
    assert mb["undefined_steps"] == [4, 5, 6, 7, 8] and mb["nonfinite_steps"] == [4, 5, 6, 7, 8]
    assert mb["share_cos_positive"] == 1.0  # over the 4 finite rows only
    assert mb["mu"] == min(r["rsi"] for r in finite) and mb["L"] == max(r["eb"] for r in finite)
    table = report.format_table(s)
    assert re.search(r"^minibatch\s+9\s+5\s", table, re.M), table
    assert "undef: rows whose ratios are undefined" in table


def test_nan_run_gives_no_verdict_from_nan_rows_and_is_not_called_a_replay():
    rows = _records(9, bad={s: math.nan for s in range(4, 9)})
    s = report.summarize(rows, 1000)
    s["replay_final_distance_ratio"] = math.nan
    md = findings_markdown(s)
    claims = _claims(md)
    assert len(claims) == 5
    assert not any("**holds**" in c or "**does not hold here**" in c for c in claims), md
    cos_claim = claims[1]
    assert "**no verdict**" in cos_claim
    assert "no verdict: the run went non-finite (5 of 9 rows have NaN or inf statistics, from steps 4, 5, 6, 7, 8)" in cos_claim
    assert "cos > 0 at 100.0 % of 4 training steps; 5 of 9 steps undefined (NaN or inf) at steps 4, 5, 6, 7, 8, left out" in cos_claim
    assert "100.0 % of 9" not in md
    assert "not a replay (NaN)" in md and "to rounding" not in md and "replayed in run 2" not in md


def test_one_inf_row_gives_no_verdict_and_is_named():
    rows = _records(20, bad={7: math.inf})
    md = findings_markdown(report.summarize(rows, 1000))
    claims = _claims(md)
    assert not any("**holds**" in c for c in claims), md
    assert "from step 7)" in claims[1] and "**no verdict**" in claims[1]


def test_rows_at_the_reference_are_counted_but_do_not_block_a_verdict():
    """c = 0 (x = x*) with finite statistics: an undefined ratio, not a run that went non-finite."""
    rows = _records(20)
    rows[0] = _row(0, "minibatch", 0.0, 1.0, 0.0)
    md = findings_markdown(report.summarize(rows, 1000))
    claim = _claims(md)[1]
    assert "**holds**" in claim and "1 of 18 steps undefined (NaN or inf) at step 0, left out" in claim


@pytest.mark.parametrize("steps,verdict", [(MIN_VERDICT_STEPS - 1, False), (MIN_VERDICT_STEPS + 3, True)])
def test_a_verdict_needs_the_stated_minimum_of_finite_steps(steps, verdict):
    # body = steps below the integer cut: with 11 steps and a 10 % tail, 10 steps in the body
    md = findings_markdown(report.summarize(_records(steps), 1000, tail_fraction=0 if not verdict else 0.1))
    claim = _claims(md)[1]
    if verdict:
        assert "**holds**" in claim
    else:
        assert "**no verdict**" in claim and f"too few measured steps ({steps}) for a verdict (at least {MIN_VERDICT_STEPS}" in claim
    assert f"A verdict needs at least {MIN_VERDICT_STEPS} measured steps" in md


def test_body_cut_is_an_integer_step():
    rows = _records(30)  # 10 % of 30 steps: cut 27.0 -> "before step 27"
    s = report.summarize(rows, 1000)
    assert s["overall_steps_below"] == 27
    md = findings_markdown(s)
    assert "the path before step 27:" in md
    rows = [r for r in _records(40) if r["step"] % 3 == 0]  # steps 0..39 by 3: tail starts at 35.1 -> 36
    s = report.summarize(rows, 1000)
    md = findings_markdown(s)
    assert re.search(r"before step (\d+):", md).group(1) == "36"
    assert not re.search(r"step \d+\.\d", md) and "steps below 36;" in report.format_table(s)
    body = [r["step"] for r in rows if r["kind"] == "minibatch" and r["step"] < 36]
    assert s["overall"]["minibatch"]["n"] == len(body)


def test_mu_not_positive_is_no_guarantee_in_the_table_and_findings():
    rows = _records(20, cos_lo=-0.5, seed=3)
    s = report.summarize(rows, 1000)
    full = s["overall"]["full"]
    assert full["mu"] < 0
    table = report.format_table(s)
    line = next(t for t in table.splitlines() if t.startswith("full "))
    assert line.rstrip().endswith("no guarantee") and "no guarantee: mu = min RSI <= 0" in table
    claim = _claims(findings_markdown(s))[4]
    assert "rate: no guarantee (mu <= 0" in claim and "**does not hold here**" in claim
    measured = claim.split(" | ")[2]
    assert measured.startswith("full-batch: mu = ") and not re.search(r"rate -?\d", measured), measured


def test_missing_measurements_are_phrased_for_the_producer():
    rows = [r for r in _records(20) if r["kind"] != "full"]
    md = findings_markdown(report.summarize(rows, 1000))
    assert "no full-batch gradient was measured (full_batch= was not given)" in md
    assert "--no-full-batch" not in md and "--lags" not in md
    s = report.summarize(rows, 1000)
    s["how_to_measure"] = {"full": "DemoConfig(full_batch=False) / --no-full-batch"}
    assert "no full-batch gradient was measured (DemoConfig(full_batch=False) / --no-full-batch)" in findings_markdown(s)


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def test_step_measurer_every_10_with_4_measured_steps_gives_no_verdict(tmp_path):
    torch.manual_seed(0)
    model = _mlp()
    gen = torch.Generator().manual_seed(1)
    X, Y = torch.randn(64, 6, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    xstar = Reference([n for n, _ in model.named_parameters()], [p.detach() + 0.3 * torch.randn_like(p) for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    geo = StepMeasurer(xstar, every=10, final_rtol=None, probe_batches=[(X[:8], Y[:8])], probe_every=10,
                       full_batch=[(X, Y)])
    for step in range(35):
        i = (step * 8) % 56
        loss = F.cross_entropy(model(X[i : i + 8]), Y[i : i + 8])
        loss.backward()
        with geo.step(model, opt, step, loss):
            opt.step()
        opt.zero_grad()
    geo.finish()
    geo.write_report(str(tmp_path))
    md = (tmp_path / "findings.md").read_text()
    verdicts = VERDICTS.findall("\n".join(_claims(md)))
    assert len(verdicts) == 5 and set(verdicts) == {"no verdict"}, md
    assert "too few measured steps (" in md
    assert "--no-full-batch" not in md


def test_nan_run_report_from_the_api(tmp_path):
    torch.manual_seed(0)
    model = _mlp()
    gen = torch.Generator().manual_seed(1)
    X, Y = torch.randn(64, 6, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    xstar = Reference([n for n, _ in model.named_parameters()], [p.detach() + 0.3 * torch.randn_like(p) for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    geo = StepMeasurer(xstar, every=1, final_rtol=None)
    for step in range(9):
        if step == 4:
            with torch.no_grad():
                model[0].weight[0, 0] = math.nan  # the run goes NaN from here
        loss = F.cross_entropy(model(X[:8]), Y[:8])
        loss.backward()
        with geo.step(model, opt, step, loss):
            opt.step()
        opt.zero_grad()
    assert math.isnan(geo.finish())
    summary = geo.write_report(str(tmp_path))
    assert summary["overall"]["minibatch"]["n_nonfinite"] == 5 and summary["overall"]["minibatch"]["nonfinite_steps"] == [4, 5, 6, 7, 8]
    md = (tmp_path / "findings.md").read_text()
    assert not any("**holds**" in c for c in _claims(md)), md
    on_disk = json.loads((tmp_path / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    assert on_disk["replay_final_distance_ratio"] == "NaN" and findings_markdown(on_disk) == md
    assert "not a replay (NaN)" in md and "to rounding" not in md and "nan %" not in md.lower()


def test_empty_probe_batch_is_a_value_error_naming_it():
    model = _mlp()
    ref = Reference.from_model(model)
    good = (torch.randn(4, 6), torch.zeros(4, dtype=torch.long))
    empty = (torch.randn(0, 6), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"probe batch 1 has 0 samples \(its first tensor has shape \[0, 6\]\)"):
        PathTracker(model, ref, probe_batches=[good, empty], probe_every=1)
    with pytest.raises(ValueError, match=r"probe batch 0 has 0 samples"):
        StepMeasurer(ref, probe_batches=[empty], probe_every=1)
    with pytest.raises(ValueError, match=r"full_batch batch 0 has 0 samples"):
        PathTracker(model, ref, full_batch=[{"x": torch.randn(0, 6)}], probe_every=1)
