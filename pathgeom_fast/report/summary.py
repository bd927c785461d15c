"""Reports of path measurements: records.csv, summary.json, a figure, a printed table.

* ``records.csv``: one row per (step, kind, sample): rsi, eb, cos, eta_star, the raw a, b, c,
  the learning rate and loss where known. ``per_tensor.csv`` likewise, per parameter tensor.
* ``summary.json``: for every kind of gradient and every measured step, the quantiles
  0/5/25/50/75/95/100 % of RSI, EB, cos and eta* over the samples of that step, the share of
  cos > 0, mu = min RSI, L = max EB (both, like the quantiles, over the rows where the ratios
  are finite; rows at x = x*, c = 0, are counted in ``n_undefined`` and their steps listed in
  ``undefined_steps``; rows whose a, b or c is itself NaN or inf, a run that went non-finite,
  in ``n_nonfinite`` and ``nonfinite_steps``; ``n_cos`` rows have a finite cosine, the share
  of cos > 0 is over them) and the implied rate
  1 - mu^2/L^2 (a contraction factor of
  ||x - x*||^2 per step of size mu/L^2, guaranteed only when mu > 0); the same over the whole
  path ("overall"), leaving out the last ``tail_fraction`` (default 10 %) of the steps, where
  x_t is so close to x* that c -> 0 makes the ratios ill-conditioned (the per-step entries
  keep every step); and the chance scale 1/sqrt(D) of a cosine in D dimensions.
  The summary also holds ``lagged`` (the lagged orthogonal cosine by lag, anchors whose both
  ends lie in the body), ``path`` (the path's own mean contraction of ||x - x*||^2 per step),
  ``step_size`` (the step taken per unit gradient ||u|| / ||g||, and eta* against it and
  against lr) and ``by_reference`` (overall, steps and path for every other reference; the
  primary reference's entry is ``{"at_top_level": true}``: its overall, steps and path are the
  top-level ones, stored once; :func:`pathgeom_fast.findings.reference_block` reads either).
  It is strict JSON: a NaN or infinite value (e.g. the replay's final distance ratio of a run
  that went NaN) is stored as the string "NaN", "inf" or "-inf", never as a number.
* ``geometry.png``: six panels (see :func:`pathgeom_fast.report.figures.plot`).
* ``findings.md`` (``write_report(..., findings=True)``): the paper's claims checked against
  the summary (:mod:`pathgeom_fast.findings`).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict

import numpy as np

from .figures import plot
from .findings import findings_markdown, reference_block
from .records import COLUMNS, LAGGED, json_safe, references_of, write_csv

QUANTILES = (0, 5, 25, 50, 75, 95, 100)
METRICS = ("rsi", "eb", "cos", "eta_star")
def _finite(v) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


#: steps named in ``undefined_steps`` / ``nonfinite_steps`` (the counts are complete)
NAMED_STEPS = 20


def _nonfinite_row(r: dict) -> bool:
    """a, b or c (where the row has them) is NaN or +-inf: the run itself went non-finite."""
    return any(r.get(k) is not None and not math.isfinite(r[k]) for k in ("a", "b", "c"))


def _block(rows: list[dict]) -> dict:
    vals = {m: np.array([np.nan if r.get(m) is None else r[m] for r in rows], dtype=np.float64) for m in METRICS}
    out = {"n": len(rows)}
    for m, v in vals.items():
        v = v[np.isfinite(v)]
        if v.size:
            qs = np.percentile(v, QUANTILES)  # all quantiles in one call (summaries have thousands of blocks)
            out[m] = {f"q{q}": _finite(x) for q, x in zip(QUANTILES, qs)}
        else:
            out[m] = {f"q{q}": None for q in QUANTILES}
    cos = vals["cos"][np.isfinite(vals["cos"])]
    out["share_cos_positive"] = float((cos > 0).mean()) if cos.size else None
    # mu and L over the rows where the ratios are defined, as the quantiles: a row at x = x*
    # (c = 0, e.g. x_0 against the x_0 reference) has EB = inf and RSI = +-inf or nan; those
    # rows are counted in n_undefined instead of making L infinite and the rate unknown
    rsi, eb = vals["rsi"][np.isfinite(vals["rsi"])], vals["eb"][np.isfinite(vals["eb"])]
    defined = np.isfinite(vals["rsi"]) & np.isfinite(vals["eb"])
    out["n_undefined"] = int((~defined).sum())
    out["undefined_steps"] = sorted({r["step"] for r, ok in zip(rows, defined) if not ok})[:NAMED_STEPS]
    bad = [r["step"] for r in rows if _nonfinite_row(r)]
    out["n_nonfinite"] = len(bad)
    out["nonfinite_steps"] = sorted(set(bad))[:NAMED_STEPS]
    out["n_cos"] = int(cos.size)
    out["cos_undefined_steps"] = sorted({r["step"] for r, v in zip(rows, vals["cos"]) if not np.isfinite(v)})[:NAMED_STEPS]
    out["n_steps"] = len({r["step"] for r in rows})
    out["n_steps_defined"] = len({r["step"] for r, ok in zip(rows, defined) if ok})
    mu = _finite(rsi.min()) if rsi.size else None
    L = _finite(eb.max()) if eb.size else None
    out["mu"] = mu
    out["L"] = L
    out["rate"] = 1.0 - mu * mu / (L * L) if mu is not None and L else None
    out["contraction_guaranteed"] = bool(mu is not None and mu > 0)
    return out


def tail_start(records: list[dict], tail_fraction: float) -> float:
    """First step of the excluded tail (an integer; inf when nothing is excluded)."""
    if not records:
        return math.inf
    lo, hi = min(r["step"] for r in records), max(r["step"] for r in records)
    # steps are integers: the body (steps < cut) is the same with the cut rounded up to one
    return math.inf if tail_fraction <= 0 else math.ceil(hi - tail_fraction * (hi - lo + 1) + 1)


def _summarize_one(records: list[dict], cut: float) -> tuple[dict, dict]:
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r["kind"] != LAGGED:  # summarised per lag, see _lagged_summary
            by_kind[r["kind"]].append(r)
    overall, per_step = {}, {}
    for kind, rows in by_kind.items():
        body = [r for r in rows if r["step"] < cut] or rows
        overall[kind] = _block(body)
        steps: dict[int, list[dict]] = defaultdict(list)
        for r in rows:
            steps[r["step"]].append(r)
        per_step[kind] = [{"step": s, **_block(rs)} for s, rs in sorted(steps.items())]
    return overall, per_step


def _quantiles(v) -> dict:
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return {f"q{q}": None for q in QUANTILES}
    return {f"q{q}": _finite(x) for q, x in zip(QUANTILES, np.percentile(v, QUANTILES))}


def _lagged_summary(records: list[dict], cut: float) -> dict:
    """Per lag k (as a string key): quantiles of the lagged orthogonal cosine over the anchors t
    whose both ends (t and t + k) lie before the tail, its mean and share of positive values."""
    by_lag: dict[int, list[float]] = defaultdict(list)
    for r in records:
        if r["kind"] == LAGGED and r["step"] + r["sample"] < cut and r["cos"] is not None and math.isfinite(r["cos"]):
            by_lag[r["sample"]].append(r["cos"])
    out = {}
    for k in sorted(by_lag):
        v = np.array(by_lag[k])
        out[str(k)] = {"n": int(v.size), "cos": _quantiles(v), "mean": float(v.mean()), "share_positive": float((v > 0).mean())}
    return out


def _path_summary(records: list[dict], cut: float) -> dict:
    """How fast the path itself approached this reference over the body: the mean contraction
    of ||x - x*||^2 per step, (c_last / c_first)^(1 / steps), from the minibatch rows' c."""
    rows = sorted((r for r in records if r["kind"] == "minibatch" and r["c"] is not None and 0 < r["c"] < math.inf),
                  key=lambda r: r["step"])
    body = [r for r in rows if r["step"] < cut] or rows
    if not body:
        return {}
    first, last = body[0], body[-1]
    n = last["step"] - first["step"]
    out = {"first_step": first["step"], "last_step": last["step"], "distance_first": math.sqrt(first["c"]),
           "distance_last": math.sqrt(last["c"]), "observed_rate": None, "observed_steps_to_halve": None}
    if n > 0:
        rate = (last["c"] / first["c"]) ** (1.0 / n)
        out["observed_rate"] = rate
        out["observed_steps_to_halve"] = math.log(0.5) / math.log(rate) if 0 < rate < 1 else None
    return out


def _step_summary(records: list[dict], cut: float) -> dict | None:
    """The step the optimizer took against the locally optimal one, per step of the body:
    ``step_per_unit_gradient`` = ||u|| / ||g|| (update u = x_t - x_{t+1}, g the minibatch
    gradient measured at x_t, before clipping; equal to lr for plain SGD), and eta* (of g)
    divided by it and by the learning rate."""
    mb = {r["step"]: r for r in records if r["kind"] == "minibatch"}
    up = {r["step"]: r for r in records if r["kind"] == "update"}
    steps = sorted(t for t in mb if t in up and t < cut and mb[t]["b"] and 0 < mb[t]["b"] < math.inf
                   and up[t]["b"] is not None and math.isfinite(up[t]["b"]))
    if not steps:
        return None
    per_g = np.array([math.sqrt(up[t]["b"] / mb[t]["b"]) for t in steps])
    eta = np.array([np.nan if mb[t]["eta_star"] is None else mb[t]["eta_star"] for t in steps])
    lr = np.array([np.nan if mb[t]["lr"] is None else mb[t]["lr"] for t in steps])
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "n": len(steps),
            "step_per_unit_gradient": _quantiles(per_g),
            "lr": _quantiles(lr),
            "eta_star": _quantiles(eta),
            "eta_star_over_step": _quantiles(eta / per_g),
            "eta_star_over_lr": _quantiles(eta / lr),
        }


def summarize(records: list[dict], numel: int | None = None, tail_fraction: float = 0.1) -> dict:
    """The summary.json content (see module docstring).

    ``overall``, ``steps``, ``path``, ``lagged`` and ``step_size`` are those of the primary
    reference (the first one in the records); ``by_reference`` holds overall, steps and path
    for every other reference, and ``{"at_top_level": True}`` for the primary one (see
    :func:`pathgeom_fast.findings.reference_block`)."""
    if not 0 <= tail_fraction < 1:
        raise ValueError(f"tail_fraction must be in [0, 1), got {tail_fraction}")
    cut = tail_start(records, tail_fraction)
    refs = references_of(records)
    by_ref = {}
    for name in refs:
        mine = [r for r in records if (r.get("reference") or "xstar") == name]
        overall, steps = _summarize_one(mine, cut)
        by_ref[name] = {"overall": overall, "steps": steps, "path": _path_summary(mine, cut)}
    primary = by_ref[refs[0]] if refs else {"overall": {}, "steps": {}, "path": {}}
    if refs:
        by_ref[refs[0]] = {"at_top_level": True}  # stored once, at the top level
    mine = [r for r in records if (r.get("reference") or "xstar") == refs[0]] if refs else []
    return {
        "numel": numel,
        "chance_cos": 1.0 / math.sqrt(numel) if numel else None,
        "tail_fraction": tail_fraction,
        "overall_steps_below": None if math.isinf(cut) else cut,
        "primary_reference": refs[0] if refs else None,
        "overall": primary["overall"],
        "steps": primary["steps"],
        "path": primary["path"],
        "lagged": _lagged_summary(mine, cut),
        "step_size": _step_summary(mine, cut),
        "by_reference": by_ref,
    }


def format_table(summary: dict) -> str:
    """A short text table of the overall summary, one line per kind of gradient (a block per
    reference when there are several)."""
    head = f"{'kind':<13}{'n':>6}{'undef':>6}{'RSI med':>11}{'EB med':>11}{'cos med':>11}{'eta* med':>11}{'cos>0':>8}{'mu':>11}{'L':>10}{'rate':>14}"
    lines = []

    def f(v, w, p=4):
        return f"{'-':>{w}}" if v is None else f"{v:>{w}.{p}g}"

    def rate(b, w):  # 1 - mu^2/L^2 is often 0.99999...: show how far below 1
        v = b["rate"]
        if b["mu"] is not None and b["mu"] <= 0:
            return f"{'no guarantee':>{w}}"  # mu <= 0: 1 - mu^2/L^2 is no contraction rate
        return f(v, w) if v is None or v < 0.999 or v >= 1 else f"{'1-' + format(1 - v, '.1e'):>{w}}"

    if summary.get("by_reference"):
        blocks = {name: reference_block(summary, name) for name in summary["by_reference"]}
    else:
        blocks = {summary.get("primary_reference") or "xstar": {"overall": summary["overall"]}}
    for name, block in blocks.items():
        if len(blocks) > 1:
            lines.append(f"against reference {name!r}:")
        lines += [head, "-" * len(head)]
        for kind, b in block["overall"].items():
            lines.append(
                f"{kind:<13}{b['n']:>6}{b.get('n_undefined', 0):>6}{f(b['rsi']['q50'], 11)}{f(b['eb']['q50'], 11)}{f(b['cos']['q50'], 11)}"
                f"{f(b['eta_star']['q50'], 11)}{f(b['share_cos_positive'], 8, 3)}{f(b['mu'], 11)}{f(b['L'], 10)}{rate(b, 14)}"
            )
    if summary.get("lagged"):
        lag = "  ".join(f"k={k}: {f(v['cos']['q50'], 0, 3).strip()}" for k, v in summary["lagged"].items())
        lines.append(f"lagged orthogonal cos (median by lag k): {lag}")
    if summary.get("overall_steps_below") is not None:
        lines.append(f"(overall: steps below {math.ceil(summary['overall_steps_below'])}; the last {summary['tail_fraction']:.0%} of the path, where x ~ x*, is left out)")
    undefined = sum(b.get("n_undefined", 0) for block in blocks.values() for b in block["overall"].values())
    if undefined:
        lines.append("undef: rows whose ratios are undefined (NaN or inf: x = x*, or a run that went non-finite), "
                     "left out of every other column")
    if any(b["mu"] is not None and b["mu"] <= 0 for block in blocks.values() for b in block["overall"].values()):
        lines.append("no guarantee: mu = min RSI <= 0, so steps of mu/L^2 guarantee no contraction")
    if summary.get("chance_cos"):
        lines.append(f"chance scale of cos in D = {summary['numel']} dimensions: 1/sqrt(D) = {summary['chance_cos']:.3g}")
    return "\n".join(lines)


def tensorboard_writer(log_dir: str):
    """A SummaryWriter when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=log_dir)


def write_report(
    out_dir: str, records, per_tensor_records=(), numel=None, title="", extra=None, tail_fraction=0.1, findings: bool = False
) -> dict:
    """Write records.csv, per_tensor.csv (if any), summary.json and geometry.png to out_dir, and
    with ``findings=True`` findings.md (the paper's claims checked against the summary)."""
    os.makedirs(out_dir, exist_ok=True)
    write_csv(records, os.path.join(out_dir, "records.csv"))
    if per_tensor_records:
        write_csv(per_tensor_records, os.path.join(out_dir, "per_tensor.csv"), ["tensor"] + COLUMNS)
    summary = summarize(records, numel, tail_fraction)
    if extra:
        summary.update(extra)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(json_safe(summary), f, indent=1, allow_nan=False)
    plot(records, summary, os.path.join(out_dir, "geometry.png"), title)
    if findings:
        with open(os.path.join(out_dir, "findings.md"), "w") as f:
            f.write(findings_markdown(summary, title))
    return summary
