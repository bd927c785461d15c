"""Per-layer view: a heatmap of cos (or RSI) per parameter tensor along the path.

Rows are the parameter tensors (in the model's order), columns the measured steps; the colour
is the per-tensor cos(g_i, x_i - x*_i) = a_i / sqrt(b_i c_i) (or RSI_i = a_i / c_i) of the
full-data gradient (the median over the probe batches when there is no full-data row), on a
diverging colour map centred at 0: red where a layer's gradient points away from x* (a wrong
turn), blue where it points toward it. Cells with no value (c_i = 0) are grey.
"""

from __future__ import annotations

import math

import numpy as np

METRICS = {"cos": "cos(g, x - x*) per tensor", "rsi": "RSI = <g, x - x*> / ||x - x*||^2 per tensor"}


def heatmap_matrix(
    per_tensor_records: list[dict], metric: str = "cos", reference: str | None = None, kind: str | None = None
) -> tuple[list[str], list[int], np.ndarray, str, str]:
    """(tensor names, steps, values [tensors, steps], reference, kind) of the heatmap.

    ``reference``: default the first one in the rows; ``kind``: "full" when there are full-data
    rows for it, else "probe" (median over the probe batches of each step)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    rows = list(per_tensor_records)
    if not rows:
        raise ValueError("no per-tensor rows to draw")
    reference = reference or (rows[0].get("reference") or "xstar")
    rows = [r for r in rows if (r.get("reference") or "xstar") == reference]
    kinds = {r["kind"] for r in rows}
    kind = kind or ("full" if "full" in kinds else "probe" if "probe" in kinds else sorted(kinds)[0])
    rows = [r for r in rows if r["kind"] == kind]
    if not rows:
        raise ValueError(f"no per-tensor rows of kind {kind!r} against reference {reference!r}")
    names = list(dict.fromkeys(r["tensor"] for r in rows))
    steps = sorted({r["step"] for r in rows})
    cells: dict[tuple[int, int], list[float]] = {}
    ni, si = {n: i for i, n in enumerate(names)}, {s: j for j, s in enumerate(steps)}
    for r in rows:
        v = r.get(metric)
        cells.setdefault((ni[r["tensor"]], si[r["step"]]), []).append(math.nan if v is None else float(v))
    out = np.full((len(names), len(steps)), np.nan)
    for (i, j), vs in cells.items():
        vs = [v for v in vs if math.isfinite(v)]
        if vs:
            out[i, j] = float(np.median(vs))
    return names, steps, out, reference, kind


def plot_heatmap(
    per_tensor_records: list[dict],
    path: str,
    metric: str = "cos",
    reference: str | None = None,
    kind: str | None = None,
    title: str = "",
) -> str:
    """Draw the heatmap to ``path`` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, steps, values, reference, kind = heatmap_matrix(per_tensor_records, metric, reference, kind)
    finite = values[np.isfinite(values)]
    lim = float(np.percentile(np.abs(finite), 99)) if finite.size else 1.0
    lim = lim if lim > 0 else 1.0
    if metric == "cos":
        lim = min(lim, 1.0)
    n_t, n_s = values.shape
    label_w = 0.07 * max(len(n) for n in names)  # inches for the tensor names
    fig, ax = plt.subplots(figsize=(min(20, max(7.0, 3 + label_w + 0.3 * n_s)), min(30, 3 + 0.18 * n_t)))
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="0.8")
    im = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=cmap, vmin=-lim, vmax=lim, interpolation="nearest")
    ystep = max(1, n_t // 60)
    ax.set_yticks(range(0, n_t, ystep))
    ax.set_yticklabels([names[i] for i in range(0, n_t, ystep)], fontsize=6 if n_t > 30 else 8)
    xstep = max(1, n_s // 20)
    ax.set_xticks(range(0, n_s, xstep))
    ax.set_xticklabels([str(steps[j]) for j in range(0, n_s, xstep)], fontsize=8, rotation=45 if n_s > 10 else 0)
    ax.set_xlabel("step (checkpoint)")
    ax.set_ylabel("parameter tensor")
    what = "full-data gradient" if kind == "full" else f"{kind} gradients (median)"
    ax.set_title(title or f"{metric} per tensor along the path\n{what}, against reference {reference!r}", fontsize=10)
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cb.set_label(METRICS[metric] + ("" if metric == "cos" else " (clipped)"), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
