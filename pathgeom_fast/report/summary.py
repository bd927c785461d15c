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
* ``geometry.png``: six panels (see :func:`plot`).
* ``findings.md`` (``write_report(..., findings=True)``): the paper's claims checked against
  the summary (:mod:`pathgeom_fast.findings`).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict

import numpy as np

from .findings import findings_markdown, reference_block, reference_label

QUANTILES = (0, 5, 25, 50, 75, 95, 100)
METRICS = ("rsi", "eb", "cos", "eta_star")
COLUMNS = ["step", "kind", "sample", "reference", "lr", "loss", "rsi", "eb", "cos", "eta_star", "a", "b", "c"]


def write_csv(rows: list[dict], path: str, columns: list[str] = COLUMNS) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def read_csv(path: str) -> list[dict]:
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = dict(r)
            for k in ("step", "sample"):
                row[k] = int(row[k])
            row["reference"] = row.get("reference") or "xstar"
            for k in ("lr", "loss", "rsi", "eb", "cos", "eta_star", "a", "b", "c"):
                if k in row:
                    row[k] = float(row[k]) if row[k] != "" else None
            out.append(row)
    return out


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


LAGGED = "lagged"


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


def references_of(records: list[dict]) -> list[str]:
    """Reference names in the order they first appear (the first is the primary one)."""
    return list(dict.fromkeys(r.get("reference") or "xstar" for r in records))


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


def _series(records, kind, key, sample=0):
    rows = [r for r in records if r["kind"] == kind and r["sample"] == sample]
    x = np.array([r["step"] for r in rows], dtype=float)
    y = np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)
    return x, y


def _finite_values(*arrays) -> np.ndarray:
    v = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays if a is not None and len(a)] or [np.array([])])
    return v[np.isfinite(v)]


def _symlog_limits(ax, values, scale_values) -> None:
    """Symmetric log scale whose linear part (|y| < linthresh) is small against the body's
    typical size, and limits that hold the body's 1-99 % range (outliers are clipped)."""
    v = _finite_values(values)
    if not v.size:
        return
    ref = np.abs(_finite_values(scale_values))
    ref = ref[ref > 0]
    lt = float(np.percentile(ref, 10)) if ref.size else float(np.percentile(np.abs(v[v != 0]), 10)) if (v != 0).any() else 1.0
    lt = 10.0 ** math.floor(math.log10(lt))  # a decade: the ticks +-lt then sit at the ends of the linear part
    ax.set_yscale("symlog", linthresh=lt, linscale=1.0)
    lo, hi = np.percentile(v, 1), np.percentile(v, 99)
    lo = min(lo, 0.0)
    hi = max(hi, 0.0)
    ax.set_ylim(lo * 2 if lo < -lt else lo - lt, hi * 2 if hi > lt else hi + lt)


def plot(records: list[dict], summary: dict, path: str, title: str = "") -> None:
    """geometry.png: six panels, against the primary reference unless said otherwise.

    RSI (symmetric log scale, so that the body of the path and its sign are both visible),
    EB (log), eta* against the step the optimizer took (the learning rate for SGD; for every
    optimizer the step per unit gradient ||u|| / ||g||), cos against the chance band +-1/sqrt(D)
    (with the update's cosine), the lagged orthogonal cosine by lag, and the controls: cos of
    the full-batch gradient against each reference. Probe minibatches are drawn as 5-95 % and
    25-75 % bands around their median; the last ``tail_fraction`` of the path (x ~ x*, where
    the ratios are ill-conditioned) is shaded and left out of the axis limits; rows with
    c = 0 (the reference point itself) are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = [r for r in records if r.get("c") is not None and r["c"] > 0]  # x = reference: nothing to plot
    primary = summary.get("primary_reference")
    refs = references_of(every)
    records = [r for r in every if (r.get("reference") or "xstar") == (primary or refs[0] if refs else None)]
    steps = summary.get("steps", {})
    cut = summary.get("overall_steps_below")
    in_body = (lambda x: x < cut) if cut is not None else (lambda x: np.ones_like(x, dtype=bool))
    last_step = max((r["step"] for r in records), default=0)
    band_kind = next((k for k in ("probe", "full", "minibatch") if k in steps), None)

    fig, axes = plt.subplots(3, 2, figsize=(12, 13.5), layout="constrained")

    def bands(ax, metric, color="C0"):
        """Probe quantile bands and median; returns (x, median) for the axis limits."""
        if band_kind != "probe":
            return np.array([]), np.array([])
        st = steps["probe"]
        x = np.array([s["step"] for s in st], dtype=float)
        q = {k: np.array([np.nan if s[metric][k] is None else s[metric][k] for s in st]) for k in ("q5", "q25", "q50", "q75", "q95")}
        K = max(s["n"] for s in st)
        ax.fill_between(x, q["q5"], q["q95"], alpha=0.18, color=color, lw=0, label=f"{K} probe minibatches, 5-95 %")
        ax.fill_between(x, q["q25"], q["q75"], alpha=0.35, color=color, lw=0, label="probes 25-75 %")
        ax.plot(x, q["q50"], color=color, lw=1.6, label="probe median")
        return x, q["q50"]

    def shade_tail(ax):
        if cut is not None and last_step >= cut:
            ax.axvspan(cut, last_step, color="gray", alpha=0.12, lw=0, label="tail (x ~ x*), not in the limits")

    def legend(ax):
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=7.5, frameon=False)

    def body_values(*pairs):
        return _finite_values(*[y[in_body(x)] for x, y in pairs if len(x)])

    def series(ax, pairs, kind, metric, *fmt, **style):
        """Plot the recorded kind's metric (sample 0) and add its (x, y) to ``pairs``."""
        if kind in steps:
            x, y = _series(records, kind, metric)
            ax.plot(x, y, *fmt, **style)
            pairs.append((x, y))

    # RSI and EB
    for ax, metric, name in ((axes[0, 0], "rsi", "RSI = <g, x - x*> / ||x - x*||^2"), (axes[0, 1], "eb", "EB = ||g|| / ||x - x*||")):
        pairs = []
        series(ax, pairs, "minibatch", metric, color="C1", lw=0.6, alpha=0.75, label="training minibatch g (before clipping)")
        pairs.append(bands(ax, metric))
        series(ax, pairs, "full", metric, "k.", ms=4, label="full-batch gradient")
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        shade_tail(ax)
        if metric == "rsi":
            ax.axhline(0, color="gray", lw=0.6)
            scale = [y[in_body(x)] for x, y in pairs[1:] if len(x)] or [pairs[0][1]]
            _symlog_limits(ax, body_values(*pairs), np.concatenate(scale) if scale else [])
            ax.set_title("RSI along the path (symmetric log scale)")
        else:
            v = body_values(*pairs)
            v = v[np.isfinite(v) & (v > 0)]
            if v.size:
                ax.set_yscale("log")
                ax.set_ylim(np.percentile(v, 0.5) / 1.5, np.percentile(v, 99.5) * 1.5)
            else:  # a run that went non-finite: nothing a log scale could show
                ax.text(0.5, 0.5, "no finite EB in the body of the path", transform=ax.transAxes, ha="center")
            ax.set_title("EB along the path")
        legend(ax)

    # eta* against the step taken
    ax = axes[1, 0]
    pairs = [bands(ax, "eta_star")]
    series(ax, pairs, "minibatch", "eta_star", color="C1", lw=0.6, alpha=0.75, label="eta* of the training minibatch g")
    series(ax, pairs, "full", "eta_star", "k.", ms=4, label="eta* of the full-batch gradient")
    comparable = summary.get("lr_comparable_to_eta_star", True)
    lr_rows = [r for r in records if r["kind"] == "minibatch" and r["lr"] is not None]
    if lr_rows and comparable:
        ax.plot([r["step"] for r in lr_rows], [r["lr"] for r in lr_rows], "r--", lw=1.3, label="learning rate used")
    elif not lr_rows and any(r["lr"] is not None for r in records):  # post-hoc analysis: the checkpoints' learning rates
        lr_at = sorted({r["step"]: r["lr"] for r in records if r["lr"] is not None}.items())
        ax.plot([s for s, _ in lr_at], [v for _, v in lr_at], "r--", lw=1.3, label="learning rate (checkpoints)")
    mb = {r["step"]: r for r in records if r["kind"] == "minibatch" and r["sample"] == 0}
    up = [r for r in records if r["kind"] == "update" and r["step"] in mb and mb[r["step"]]["b"]]
    if up:
        x = np.array([r["step"] for r in up], dtype=float)
        y = np.array([math.sqrt(r["b"] / mb[r["step"]]["b"]) for r in up])
        ax.plot(x, y, color="C2", lw=1.2, label="step taken per unit gradient ||u|| / ||g||")
    ax.axhline(0, color="gray", lw=0.6)
    shade_tail(ax)
    _symlog_limits(ax, body_values(*[p for p in pairs if len(p[0])]), pairs[0][1] if len(pairs[0][0]) else body_values(*pairs))
    what = "learning rate and " if comparable else ""
    ax.set_title(f"locally optimal step eta* = <g, x - x*> / ||g||^2 vs {what}step taken", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("step size (units of g)")
    legend(ax)

    # cos
    ax = axes[1, 1]
    pairs = [bands(ax, "cos")]
    series(ax, pairs, "minibatch", "cos", color="C1", lw=0.6, alpha=0.75, label="training minibatch g")
    series(ax, pairs, "update", "cos", color="C4", lw=0.9, alpha=0.9, label="update u = x_t - x_{t+1}")
    series(ax, pairs, "full", "cos", "k.", ms=4, label="full-batch gradient")
    if summary.get("chance_cos"):
        ch = summary["chance_cos"]
        ax.axhspan(-ch, ch, color="red", alpha=0.35, lw=0, label=f"chance +-1/sqrt(D) = +-{ch:.2g}")
    ax.axhline(0, color="gray", lw=0.6)
    shade_tail(ax)
    v = body_values(*[p for p in pairs if len(p[0])])
    if v.size:
        lo, hi = np.percentile(v, 0.5), np.percentile(v, 99.5)
        pad = 0.08 * (hi - lo + 1e-9)
        ax.set_ylim(max(-1.02, min(lo - pad, -0.05)), min(1.02, hi + pad))
    ax.set_title("cos(g, x - x*)")
    ax.set_xlabel("step")
    ax.set_ylabel("cosine")
    legend(ax)

    # lagged orthogonal cosine
    ax = axes[2, 0]
    lagged = [r for r in records if r["kind"] == LAGGED and r["cos"] is not None and math.isfinite(r["cos"])]
    lags = sorted({r["sample"] for r in lagged})
    if lags:
        data = [[r["cos"] for r in lagged if r["sample"] == k and (cut is None or r["step"] + k < cut)] or [np.nan] for k in lags]
        ax.boxplot(data, positions=range(len(lags)), whis=(5, 95), showfliers=False, widths=0.5,
                   medianprops={"color": "C0", "lw": 2}, label=None)
        for i, d in enumerate(data):
            ax.plot(np.full(len(d), i) + np.linspace(-0.15, 0.15, len(d)), d, ".", color="C1", ms=3, alpha=0.6)
        ax.set_xticks(range(len(lags)), [str(k) for k in lags])
        if summary.get("chance_cos"):
            ch = summary["chance_cos"]
            ax.axhspan(-ch, ch, color="red", alpha=0.35, lw=0, label=f"chance +-1/sqrt(D) = +-{ch:.2g}")
        ax.axhline(0, color="gray", lw=0.6)
        ax.plot([], [], "s", color="white", mec="k", label="box 25-75 %, whiskers 5-95 %, line median")
        ax.plot([], [], ".", color="C1", label="one anchor step t")
        legend(ax)
    else:
        ax.text(0.5, 0.5, "lagged cosine not measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("lagged cosine of the components orthogonal to x - x*")
    ax.set_xlabel("lag k (steps)")
    ax.set_ylabel("cos(g_t perp, g_{t+k} perp)")

    # controls: the same cosine against every reference
    ax = axes[2, 1]
    kind = next((k for k in ("full", "probe", "minibatch") if k in steps), None)
    pairs = []
    for i, name in enumerate(refs):
        if kind is None:
            break
        mine = [r for r in every if (r.get("reference") or "xstar") == name]
        if kind == "probe":
            st = reference_block(summary, name)["steps"].get("probe", [])
            x = np.array([s["step"] for s in st], dtype=float)
            y = np.array([np.nan if s["cos"]["q50"] is None else s["cos"]["q50"] for s in st])
        else:
            x, y = _series(mine, kind, "cos")
        ax.plot(x, y, "-" if kind == "minibatch" else ".-", color=f"C{[0, 3, 2, 5, 6][i % 5]}", lw=1, ms=4, label=reference_label(name))
        pairs.append((x, y))
    if summary.get("chance_cos"):
        ch = summary["chance_cos"]
        ax.axhspan(-ch, ch, color="red", alpha=0.35, lw=0, label="chance +-1/sqrt(D)")
    ax.axhline(0, color="gray", lw=0.6)
    shade_tail(ax)
    what = {"full": "full-batch gradient", "probe": "probe median", "minibatch": "training minibatch"}.get(kind, "")
    ax.set_title(f"controls: cos({what}, x - reference) per reference", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("cosine")
    legend(ax)

    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tensorboard_writer(log_dir: str):
    """A SummaryWriter when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=log_dir)


def json_safe(value):
    """``value`` with every NaN or +-inf float replaced by the string "NaN", "inf" or "-inf" (strict
    JSON has no such numbers; ``float()`` reads the strings back)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


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
