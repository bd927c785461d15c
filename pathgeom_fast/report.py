"""Reports of path measurements: records.csv, summary.json, a figure, a printed table.

* ``records.csv``: one row per (step, kind, sample): rsi, eb, cos, eta_star, the raw a, b, c,
  the learning rate and loss where known. ``per_tensor.csv`` likewise, per parameter tensor.
* ``summary.json``: for every kind of gradient and every measured step, the quantiles
  0/5/25/50/75/95/100 % of RSI, EB, cos and eta* over the samples of that step, the share of
  cos > 0, mu = min RSI, L = max EB and the implied rate 1 - mu^2/L^2 (a contraction factor of
  ||x - x*||^2 per step of size mu/L^2, guaranteed only when mu > 0); the same over the whole
  path ("overall"), leaving out the last ``tail_fraction`` (default 10 %) of the steps, where
  x_t is so close to x* that c -> 0 makes the ratios ill-conditioned (the per-step entries
  keep every step); and the chance scale 1/sqrt(D) of a cosine in D dimensions.
* ``geometry.png``: RSI and EB quantile bands along training, eta* against the learning rate
  actually used, and cos against the +-1/sqrt(D) band.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict

import numpy as np

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


def _block(rows: list[dict]) -> dict:
    vals = {m: np.array([r[m] for r in rows], dtype=np.float64) for m in METRICS}
    out = {"n": len(rows)}
    for m, v in vals.items():
        v = v[np.isfinite(v)]
        out[m] = {f"q{q}": _finite(np.percentile(v, q)) if v.size else None for q in QUANTILES}
    cos = vals["cos"][np.isfinite(vals["cos"])]
    out["share_cos_positive"] = float((cos > 0).mean()) if cos.size else None
    mu = _finite(np.nanmin(vals["rsi"])) if np.isfinite(vals["rsi"]).any() else None
    L = _finite(np.nanmax(vals["eb"])) if np.isfinite(vals["eb"]).any() else None
    out["mu"] = mu
    out["L"] = L
    out["rate"] = 1.0 - mu * mu / (L * L) if mu is not None and L else None
    out["contraction_guaranteed"] = bool(mu is not None and mu > 0)
    return out


def tail_start(records: list[dict], tail_fraction: float) -> float:
    """First step of the excluded tail."""
    if not records:
        return math.inf
    lo, hi = min(r["step"] for r in records), max(r["step"] for r in records)
    return math.inf if tail_fraction <= 0 else hi - tail_fraction * (hi - lo + 1) + 1


def _summarize_one(records: list[dict], cut: float) -> tuple[dict, dict]:
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for r in records:
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


def references_of(records: list[dict]) -> list[str]:
    """Reference names in the order they first appear (the first is the primary one)."""
    return list(dict.fromkeys(r.get("reference") or "xstar" for r in records))


def summarize(records: list[dict], numel: int | None = None, tail_fraction: float = 0.1) -> dict:
    """The summary.json content (see module docstring).

    ``overall`` and ``steps`` are those of the primary reference (the first one in the
    records); ``by_reference`` holds the same for every reference."""
    if not 0 <= tail_fraction < 1:
        raise ValueError(f"tail_fraction must be in [0, 1), got {tail_fraction}")
    cut = tail_start(records, tail_fraction)
    refs = references_of(records)
    by_ref = {}
    for name in refs:
        overall, steps = _summarize_one([r for r in records if (r.get("reference") or "xstar") == name], cut)
        by_ref[name] = {"overall": overall, "steps": steps}
    primary = by_ref[refs[0]] if refs else {"overall": {}, "steps": {}}
    return {
        "numel": numel,
        "chance_cos": 1.0 / math.sqrt(numel) if numel else None,
        "tail_fraction": tail_fraction,
        "overall_steps_below": None if math.isinf(cut) else cut,
        "primary_reference": refs[0] if refs else None,
        "overall": primary["overall"],
        "steps": primary["steps"],
        "by_reference": by_ref,
    }


def format_table(summary: dict) -> str:
    """A short text table of the overall summary, one line per kind of gradient (a block per
    reference when there are several)."""
    head = f"{'kind':<13}{'n':>6}{'RSI med':>11}{'EB med':>11}{'cos med':>11}{'eta* med':>11}{'cos>0':>8}{'mu':>11}{'L':>10}{'rate':>9}"
    lines = []

    def f(v, w, p=4):
        return f"{'-':>{w}}" if v is None else f"{v:>{w}.{p}g}"

    blocks = summary.get("by_reference") or {summary.get("primary_reference") or "xstar": {"overall": summary["overall"]}}
    for name, block in blocks.items():
        if len(blocks) > 1:
            lines.append(f"against reference {name!r}:")
        lines += [head, "-" * len(head)]
        for kind, b in block["overall"].items():
            lines.append(
                f"{kind:<13}{b['n']:>6}{f(b['rsi']['q50'], 11)}{f(b['eb']['q50'], 11)}{f(b['cos']['q50'], 11)}"
                f"{f(b['eta_star']['q50'], 11)}{f(b['share_cos_positive'], 8, 3)}{f(b['mu'], 11)}{f(b['L'], 10)}{f(b['rate'], 9)}"
            )
    if summary.get("overall_steps_below") is not None:
        lines.append(f"(overall: steps below {summary['overall_steps_below']:g}; the last {summary['tail_fraction']:.0%} of the path, where x ~ x*, is left out)")
    if summary.get("chance_cos"):
        lines.append(f"chance scale of cos in D = {summary['numel']} dimensions: 1/sqrt(D) = {summary['chance_cos']:.3g}")
    return "\n".join(lines)


def plot(records: list[dict], summary: dict, path: str, title: str = "") -> None:
    """geometry.png: the paper-style figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = summary.get("primary_reference")
    if primary is not None:
        records = [r for r in records if (r.get("reference") or "xstar") == primary]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    band_kind = next((k for k in ("probe", "full", "minibatch") if k in summary["steps"]), None)

    def series(kind, key):
        rows = [r for r in records if r["kind"] == kind and r["sample"] == 0]
        return np.array([r["step"] for r in rows]), np.array([r[key] if r[key] is not None else np.nan for r in rows], dtype=float)

    def bands(ax, metric, label):
        if band_kind is None:
            return
        st = summary["steps"][band_kind]
        x = np.array([s["step"] for s in st])
        q = {k: np.array([np.nan if s[metric][k] is None else s[metric][k] for s in st]) for k in ("q5", "q25", "q50", "q75", "q95")}
        if band_kind == "probe":
            ax.fill_between(x, q["q5"], q["q95"], alpha=0.2, color="C0", label=f"{label} probes 5-95%")
            ax.fill_between(x, q["q25"], q["q75"], alpha=0.35, color="C0", label="25-75%")
        ax.plot(x, q["q50"], color="C0", lw=1.5, label=f"{band_kind} median")

    cut = summary.get("overall_steps_below")
    body = [r for r in records if cut is None or r["step"] < cut]

    def scale_to_body(ax, metric, log):
        v = np.array([r[metric] for r in body if r[metric] is not None], dtype=float)
        v = v[np.isfinite(v)]
        if v.size:
            lo, hi = np.percentile(v, 0.5), np.percentile(v, 99.5)
            if log and lo > 0:
                ax.set_ylim(lo / 2, hi * 2)
            else:
                pad = 0.1 * (hi - lo + 1e-12)
                ax.set_ylim(lo - pad, hi + pad)

    def shade_tail(ax):
        if cut is not None:
            ax.axvspan(cut, max(r["step"] for r in records), color="gray", alpha=0.12, lw=0, label="tail (x ~ x*)")

    for ax, metric, name in ((axes[0, 0], "rsi", "RSI"), (axes[0, 1], "eb", "EB")):
        if "minibatch" in summary["steps"]:
            x, y = series("minibatch", metric)
            ax.plot(x, y, color="C1", lw=0.6, alpha=0.7, label="training minibatch")
        bands(ax, metric, name)
        if "full" in summary["steps"]:
            x, y = series("full", metric)
            ax.plot(x, y, "k.", ms=3, label="full batch")
        ax.set_title(f"{name} along training")
        ax.set_xlabel("step")
        shade_tail(ax)
        ax.legend(fontsize=7)
    axes[0, 0].axhline(0, color="gray", lw=0.5)
    scale_to_body(axes[0, 0], "rsi", log=False)
    axes[0, 1].set_yscale("log")
    scale_to_body(axes[0, 1], "eb", log=True)

    ax = axes[1, 0]
    bands(ax, "eta_star", "eta*")
    if "minibatch" in summary["steps"]:
        x, y = series("minibatch", "eta_star")
        ax.plot(x, y, color="C1", lw=0.6, alpha=0.7, label="eta* training minibatch")
        lr_rows = [r for r in records if r["kind"] == "minibatch" and r["lr"] is not None]
        if lr_rows:
            ax.plot([r["step"] for r in lr_rows], [r["lr"] for r in lr_rows], "r--", lw=1.2, label="learning rate used")
    elif any(r["lr"] is not None for r in records):  # post-hoc analysis: the checkpoints' learning rates
        lr_at = sorted({r["step"]: r["lr"] for r in records if r["lr"] is not None}.items())
        ax.plot([s for s, _ in lr_at], [v for _, v in lr_at], "r--", lw=1.2, label="learning rate (checkpoints)")
    ax.set_yscale("symlog", linthresh=1e-3)
    shade_tail(ax)
    ax.set_title("locally optimal step eta* vs learning rate")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)

    ax = axes[1, 1]
    bands(ax, "cos", "cos")
    if "minibatch" in summary["steps"]:
        x, y = series("minibatch", "cos")
        ax.plot(x, y, color="C1", lw=0.6, alpha=0.7, label="training minibatch")
    if summary.get("chance_cos"):
        ch = summary["chance_cos"]
        ax.axhspan(-ch, ch, color="gray", alpha=0.3, label="+-1/sqrt(D) (chance)")
    ax.axhline(0, color="gray", lw=0.5)
    shade_tail(ax)
    ax.set_title("cos(g, x - x*)")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tensorboard_writer(log_dir: str):
    """A SummaryWriter when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=log_dir)


def write_report(out_dir: str, records, per_tensor_records=(), numel=None, title="", extra=None, tail_fraction=0.1) -> dict:
    """Write records.csv, per_tensor.csv (if any), summary.json and geometry.png to out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    write_csv(records, os.path.join(out_dir, "records.csv"))
    if per_tensor_records:
        write_csv(per_tensor_records, os.path.join(out_dir, "per_tensor.csv"), ["tensor"] + COLUMNS)
    summary = summarize(records, numel, tail_fraction)
    if extra:
        summary.update(extra)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(records, summary, os.path.join(out_dir, "geometry.png"), title)
    return summary
