"""The figure of a report: geometry.png, six panels (see :func:`plot`)."""

from __future__ import annotations

import math

import numpy as np

from .findings import reference_block, reference_label
from .records import LAGGED, references_of


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
