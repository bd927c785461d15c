"""``pathgeom compare RUN_DIR [RUN_DIR ...] --out DIR``: several measured runs side by side.

Each run is an output folder of ``pathgeom demo`` or ``pathgeom analyze`` (its ``summary.json``
and ``records.csv``). Per run, from its own files:

* the settings in which it differs from the first run (the demo's ``config``; for an analysis
  its run folder, mode and probe settings), D = ``numel``, the final training loss and accuracy
  where the run recorded them;
* ``mu`` and ``L``: the run's summary values over the body of the path of the full-batch rows
  (the probe rows when no full batch was measured; ``kind`` says which), and from them the
  step size ``eta_opt = mu / L^2`` and the rate ``rate_opt = 1 - mu^2 / L^2`` that the bounds
  RSI >= mu, EB <= L guarantee for gradient steps of that size;
* the learning rates used (peak, median and minimum of the lr column over the body) with
  ``lr_over_eta_opt`` = peak lr / eta_opt and the implied per-step factor of ||x - x*||^2 at a
  step eta, ``1 - 2 eta mu + eta^2 L^2`` (at the peak and the median lr, and at the step the
  optimizer really took per unit gradient, ||u|| / ||g||, which differs from lr with momentum or
  Adam); a factor >= 1 means the bounds imply no contraction at that step size;
* the median cosine of the training minibatch gradients against the chance scale 1/sqrt(D);
* the path's actual median per-step contraction of ||x - x*||^2 (median over consecutive
  measured steps of the body of c_{t+1} / c_t, c = ||x_t - x*||^2 from the minibatch rows), and
  the envelope: ||x_0 - x*||^2 times the product of the implied factors at the learning rates
  of the schedule, against the actual distance at the end of the body;
* every claim of ``findings.md`` (:data:`pathgeom_fast.findings.CLAIMS`) with its verdict.

Writes ``compare.json`` (``runs``: one object per run), ``compare.md`` (a table, sentences
computed from the numbers, the claims side by side) and ``compare.png`` (RSI and EB
distributions per run, cos against 1/sqrt(D), ||x_t - x*|| against the envelope).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from . import findings
from .records import json_safe, read_csv

#: config keys that say where or how fast a run ran, not what it measured
IGNORED = {"out", "progress", "threads", "fsdp", "model", "device", "backend"}
#: an analysis has no config: these summary keys stand for it
ANALYZE_KEYS = ("run", "format", "mode", "probe_batches", "batch_size", "full_batches")


class CompareError(ValueError):
    """A run folder that cannot be compared (missing, or not a demo/analyze output)."""


def _num(v):
    """summary.json stores NaN and inf as strings: back to floats."""
    if isinstance(v, str) and v in ("NaN", "inf", "-inf"):
        return float(v)
    return v


def _restore(obj):
    if isinstance(obj, dict):
        return {k: _restore(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore(v) for v in obj]
    return _num(obj)


def load_run(path: str) -> tuple[dict, list[dict]]:
    """(summary, records) of a demo or analyze output folder."""
    if not os.path.isdir(path):
        raise CompareError(f"run folder {path!r} does not exist")
    missing = [n for n in ("summary.json", "records.csv") if not os.path.isfile(os.path.join(path, n))]
    if missing:
        raise CompareError(f"{path!r} has no {' or '.join(missing)} (expected an output folder of pathgeom demo or analyze)")
    try:
        with open(os.path.join(path, "summary.json")) as f:
            summary = _restore(json.load(f))
    except ValueError as exc:
        raise CompareError(f"{os.path.join(path, 'summary.json')!r} is not valid JSON: {exc}") from exc
    if not isinstance(summary, dict) or "overall" not in summary:
        raise CompareError(f"{os.path.join(path, 'summary.json')!r} is not a pathgeom summary (no 'overall')")
    return summary, read_csv(os.path.join(path, "records.csv"))


def settings_of(summary: dict) -> dict:
    """What the run was asked to do: the demo's config, or the analysis' run and probe settings."""
    if isinstance(summary.get("config"), dict):
        return {k: v for k, v in summary["config"].items() if k not in IGNORED}
    return {k: summary[k] for k in ANALYZE_KEYS if k in summary}


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def differences(settings: dict, first: dict) -> dict:
    """The settings in which a run differs from the first run (key -> this run's value)."""
    return {k: _jsonable(settings.get(k)) for k in sorted(set(settings) | set(first))
            if _jsonable(settings.get(k)) != _jsonable(first.get(k))}


def factor(eta, mu, L):
    """The implied per-step factor of ||x - x*||^2 for a step eta along -g with RSI >= mu and
    EB <= L: ||x - eta g - x*||^2 = c - 2 eta a + eta^2 b <= c (1 - 2 eta mu + eta^2 L^2)."""
    if eta is None or mu is None or L is None or not all(math.isfinite(v) for v in (eta, mu, L)):
        return None
    return 1.0 - 2.0 * eta * mu + eta * eta * L * L


def _fin(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def _primary_rows(summary: dict, records: list[dict], kind: str) -> list[dict]:
    ref = summary.get("primary_reference") or "xstar"
    return [r for r in records if r["kind"] == kind and (r.get("reference") or "xstar") == ref]


def _body(summary: dict, rows: list[dict]) -> list[dict]:
    cut = summary.get("overall_steps_below")
    return [r for r in rows if cut is None or r["step"] < cut]


def distances(summary: dict, records: list[dict]) -> tuple[list[int], list[float], list[float | None]]:
    """(steps, c_t = ||x_t - x*||^2, lr_t) of the training steps, primary reference, in order
    (the minibatch rows; analyses measure checkpoints: their full-batch or probe rows)."""
    for kind in ("minibatch", "full", "probe"):
        rows = [r for r in _primary_rows(summary, records, kind) if r["c"] is not None and math.isfinite(r["c"])]
        if rows:
            by_step = {}
            for r in rows:
                by_step.setdefault(r["step"], r)
            steps = sorted(by_step)
            return steps, [by_step[s]["c"] for s in steps], [by_step[s]["lr"] for s in steps]
    return [], [], []


def envelope(steps, c, lrs, mu, L) -> list[float] | None:
    """||x_0 - x*||^2 times the implied factors 1 - 2 lr_s mu + lr_s^2 L^2 of every step s taken
    before t (consecutive measured steps t0 < t1 count t1 - t0 steps at lr_t0), as distances."""
    if not steps or mu is None or L is None or any(v is None for v in lrs):
        return None
    out = [math.sqrt(c[0])]
    sq = c[0]
    for i in range(1, len(steps)):
        f = factor(lrs[i - 1], mu, L)
        sq *= max(f, 0.0) ** (steps[i] - steps[i - 1])
        out.append(math.sqrt(sq))
    return out


def median_contraction(summary: dict, records: list[dict]) -> float | None:
    """Median over consecutive measured steps of the body of (c_{t+1} / c_t)^(1 / gap)."""
    steps, c, _ = distances(summary, records)
    cut = summary.get("overall_steps_below")
    ratios = [(c[i + 1] / c[i]) ** (1.0 / (steps[i + 1] - steps[i])) for i in range(len(steps) - 1)
              if (cut is None or steps[i + 1] < cut) and c[i] > 0]
    return float(np.median(ratios)) if ratios else None


def _q50(block: dict | None, metric: str):
    return _fin(((block or {}).get(metric) or {}).get("q50"))


def run_entry(path: str, summary: dict, records: list[dict], first_settings: dict | None, label: str) -> dict:
    """One object of compare.json's ``runs`` (see the module docstring)."""
    overall = summary.get("overall") or {}
    kind = next((k for k in ("full", "probe") if k in overall), None)
    block = overall.get(kind) if kind else None
    mu, L = (_fin(block.get("mu")), _fin(block.get("L"))) if block else (None, None)
    eta_opt = mu / L**2 if mu is not None and L else None
    rate_opt = 1.0 - mu**2 / L**2 if mu is not None and L else None
    numel = summary.get("numel")
    settings = settings_of(summary)
    _, _, lr_all = distances(summary, records)
    body_lr = [r["lr"] for r in _body(summary, _primary_rows(summary, records, "minibatch"))
               if r["lr"] is not None and math.isfinite(r["lr"])]
    if not body_lr:
        body_lr = [v for v in lr_all if v is not None and math.isfinite(v)]
    lr = {"peak": max(body_lr), "median": float(np.median(body_lr)), "min": min(body_lr)} if body_lr else None
    if lr and isinstance(settings.get("lr"), (int, float)):
        lr["configured"] = settings["lr"]
    step = _fin(((summary.get("step_size") or {}).get("step_per_unit_gradient") or {}).get("q50"))
    mb = overall.get("minibatch")
    cos_med = _q50(mb, "cos")
    chance = summary.get("chance_cos") or (1 / math.sqrt(numel) if numel else None)
    steps, c, lrs = distances(summary, records)
    env = envelope(steps, c, lrs, mu, L)
    cut = summary.get("overall_steps_below")
    end = max((i for i, s in enumerate(steps) if cut is None or s < cut), default=None)
    claims = []
    for fn in findings.CLAIMS:
        try:
            cl = fn(summary)
            claims.append({"claim": cl["claim"], "verdict": cl["verdict"], "measured": cl["measured"]})
        except Exception as exc:  # an older or partial summary: say so rather than fail the comparison
            claims.append({"claim": fn.__name__, "verdict": "not read", "measured": f"{type(exc).__name__}: {exc}"})
    return {
        "dir": path,
        "label": label,
        "task": summary.get("task") or ("analyze" if "run" in summary else None),
        "description": summary.get("task_description"),
        "differs": differences(settings, first_settings) if first_settings is not None else {},
        "numel": numel,
        "final_train_loss": _fin(summary.get("final_train_loss")),
        "final_train_accuracy": _fin(summary.get("final_train_accuracy")),
        "optimizer": summary.get("optimizer") or settings.get("optimizer"),
        "kind": kind,
        "mu": mu,
        "L": L,
        "eta_opt": eta_opt,
        "rate_opt": rate_opt,
        "contraction_guaranteed": bool(mu is not None and mu > 0),
        "rsi_median": _q50(block, "rsi"),
        "eb_median": _q50(block, "eb"),
        "lr": lr,
        "lr_comparable_to_eta_star": summary.get("lr_comparable_to_eta_star", True),
        "lr_over_eta_opt": lr["peak"] / eta_opt if lr and eta_opt and eta_opt > 0 else None,  # mu <= 0: no eta_opt
        "factor_at_peak_lr": factor(lr["peak"], mu, L) if lr else None,
        "factor_at_median_lr": factor(lr["median"], mu, L) if lr else None,
        "step_per_unit_gradient": step,
        "factor_at_step_taken": factor(step, mu, L),
        "cos_median": cos_med,
        "chance_cos": chance,
        "cos_over_chance": cos_med / chance if cos_med is not None and chance else None,
        "median_contraction": median_contraction(summary, records),
        "observed_rate": _fin((summary.get("path") or {}).get("observed_rate")),
        "distance_first": math.sqrt(c[0]) if c else None,
        "distance_end_of_body": math.sqrt(c[end]) if end is not None else None,
        "envelope_end_of_body": env[end] if env and end is not None else None,
        "end_of_body_step": steps[end] if end is not None else None,
        "claims": claims,
    }


def _labels(paths: list[str]) -> list[str]:
    names = [os.path.basename(os.path.normpath(p)) or p for p in paths]
    if len(set(names)) == len(names):
        return names
    common = os.path.commonpath([os.path.abspath(p) for p in paths])
    return [os.path.relpath(os.path.abspath(p), common) if len(paths) > 1 else n for p, n in zip(paths, names)]


def compare_runs(paths: list[str], out: str, labels: list[str] | None = None) -> dict:
    """Read the runs, write compare.json, compare.md and compare.png to ``out``; return the JSON."""
    if not paths:
        raise CompareError("no run folders given")
    loaded = [load_run(p) for p in paths]
    labels = list(labels) if labels else _labels(paths)
    if len(labels) != len(paths):
        raise CompareError(f"{len(labels)} labels for {len(paths)} runs")
    first = settings_of(loaded[0][0])
    runs = [run_entry(p, s, r, None if i == 0 else first, lab) for i, (p, (s, r), lab) in enumerate(zip(paths, loaded, labels))]
    result = {"runs": runs}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump(json_safe(result), f, indent=1, allow_nan=False)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(markdown(result))
    plot(result, loaded, os.path.join(out, "compare.png"))
    return result


# ------------------------------------------------------------------------------------------
# compare.md
# ------------------------------------------------------------------------------------------


def _g(v, p: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    return f"{v:.{p}g}"


def _rate(v) -> str:
    """1 - x for rates very close to 1 (as the demo's table)."""
    if v is None:
        return "-"
    return f"1-{1 - v:.2g}" if 0.999 < v < 1 else _g(v, 4)


_PHRASES = {
    ("batchnorm", False): "without BatchNorm", ("batchnorm", True): "with BatchNorm",
    ("skip", False): "without skip connections", ("skip", True): "with skip connections",
}


def phrase(differs: dict) -> str:
    """'without BatchNorm', 'with lr 0.1', ... for the settings a run changes."""
    parts = []
    for k, v in differs.items():
        if (k, v) in _PHRASES:
            parts.append(_PHRASES[(k, v)])
        else:
            parts.append(f"with {k.replace('_', ' ')} {_g(v, 4) if isinstance(v, float) else v}")
    return ", ".join(parts) if parts else "with the same settings"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def sentences(result: dict) -> list[str]:
    """The computed comparisons of compare.md, one per run after the first, then one per run on
    its learning rate."""
    runs = result["runs"]
    base = runs[0]
    out = []
    for r in runs[1:]:
        what = "full-batch" if r["kind"] == "full" else (r["kind"] or "full-batch")
        what_differs = phrase(r["differs"])
        s = (f"{what_differs[:1].upper() + what_differs[1:]} ({r['label']} vs {base['label']}) the {what} RSI median is "
             f"{_g(r['rsi_median'])} vs {_g(base['rsi_median'])} (mu {_g(r['mu'])} vs {_g(base['mu'])}); EB median "
             f"{_g(r['eb_median'])} vs {_g(base['eb_median'])} (L {_g(r['L'])} vs {_g(base['L'])}); eta_opt = mu/L^2 "
             f"{_g(r['eta_opt'])} vs {_g(base['eta_opt'])}; median minibatch cos {_g(r['cos_median'])} vs "
             f"{_g(base['cos_median'])}; final loss {_g(r['final_train_loss'], 4)} vs {_g(base['final_train_loss'], 4)}")
        if r["numel"] != base["numel"]:
            s += f"; D = {r['numel']:,} vs {base['numel']:,}"
        out.append(s + ".")
    for r in runs:
        lr = r["lr"]
        if not lr:
            out.append(f"{r['label']}: no learning rate recorded.")
            continue
        s = f"{r['label']}: the learning rate used (peak {_g(lr['peak'])}) is "
        if r["eta_opt"] is not None and r["eta_opt"] <= 0:
            s += f"against eta_opt = {_g(r['eta_opt'])} <= 0 (mu <= 0: no step size is guaranteed to contract)"
        elif r["lr_over_eta_opt"] is None:
            s += "not comparable to eta_opt (mu or L undefined)"
        else:
            s += f"{_g(r['lr_over_eta_opt'])} x eta_opt = {_g(r['eta_opt'])}"
        f = r["factor_at_peak_lr"]
        if f is not None:
            s += (f"; at that lr the implied per-step factor of ||x - x*||^2 is {_rate(f)}"
                  + (" (>= 1: the bounds imply no contraction)" if f >= 1 else ""))
        if r["median_contraction"] is not None:
            s += f"; the path's actual median per-step factor is {_rate(r['median_contraction'])}"
        if r["envelope_end_of_body"] is not None and r["distance_end_of_body"] is not None:
            s += (f"; at step {r['end_of_body_step']} ||x - x*|| is {_g(r['distance_end_of_body'])} against the envelope's "
                  f"{_g(r['envelope_end_of_body'])} (from {_g(r['distance_first'])})")
        if r["step_per_unit_gradient"] is not None and r["lr"] and r["step_per_unit_gradient"] != 0:
            s += f"; the step taken per unit gradient, {_g(r['step_per_unit_gradient'])}, gives a factor {_rate(r['factor_at_step_taken'])}"
        if not r["lr_comparable_to_eta_star"]:
            s += f" ({r['optimizer']}: the lr is not a step per unit gradient)"
        out.append(s + ".")
    return out


def markdown(result: dict) -> str:
    runs = result["runs"]
    lines = [f"# Comparison of {len(runs)} run{'s' if len(runs) != 1 else ''}", ""]
    lines += ["| run | task | differs from the first | D | final loss | accuracy | mu | L | eta_opt = mu/L^2 | "
              "rate_opt = 1-mu^2/L^2 | lr peak | lr / eta_opt | factor at lr | median cos | x 1/sqrt(D) | median contraction |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        diff = ", ".join(f"{k}={v}" for k, v in r["differs"].items()) or "-"
        lines.append("| " + " | ".join(_cell(x) for x in (
            r["label"], r["task"] or "-", diff, f"{r['numel']:,}" if r["numel"] else "-", _g(r["final_train_loss"], 4),
            _g(r["final_train_accuracy"]), _g(r["mu"]), _g(r["L"]), _g(r["eta_opt"]),
            _rate(r["rate_opt"]) + ("" if r["contraction_guaranteed"] or r["rate_opt"] is None else " (mu <= 0: no guarantee)"),
            _g((r["lr"] or {}).get("peak")), _g(r["lr_over_eta_opt"]), _rate(r["factor_at_peak_lr"]), _g(r["cos_median"]),
            _g(r["cos_over_chance"]), _rate(r["median_contraction"]))) + " |")
    kinds = {r["kind"] for r in runs}
    lines += ["", f"mu = min RSI and L = max EB of the {' / '.join(k or '-' for k in sorted(kinds, key=str))} gradient rows "
              "over the body of each path (each run's own summary.json); the factor at lr is 1 - 2 lr mu + lr^2 L^2 at the "
              "peak learning rate; the median contraction is the median over the body of ||x_t+1 - x*||^2 / ||x_t - x*||^2.",
              "", "## What the numbers say", ""]
    lines += [f"- {s}" for s in sentences(result)]
    lines += ["", "## The claims of findings.md, run by run", ""]
    lines += ["| # | claim | " + " | ".join(_cell(r["label"]) for r in runs) + " |",
              "| --- | --- | " + " | ".join("---" for _ in runs) + " |"]
    n = max(len(r["claims"]) for r in runs)
    for i in range(n):
        name = next((r["claims"][i]["claim"] for r in runs if i < len(r["claims"])), "")
        cells = [f"**{r['claims'][i]['verdict']}**" if i < len(r["claims"]) else "-" for r in runs]
        lines.append(f"| {i + 1} | {_cell(name)} | " + " | ".join(cells) + " |")
    lines.append("")
    for i in range(n):
        name = next((r["claims"][i]["claim"] for r in runs if i < len(r["claims"])), "")
        lines += [f"**{i + 1}. {name}**", ""]
        lines += [f"- {r['label']} (**{r['claims'][i]['verdict']}**): {r['claims'][i]['measured']}" for r in runs if i < len(r["claims"])]
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# compare.png
# ------------------------------------------------------------------------------------------


def plot(result: dict, loaded: list[tuple[dict, list[dict]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    n = len(runs)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    labels = [r["label"] for r in runs]
    pos = np.arange(1, n + 1)

    def values(kind_of_run, metric):
        out = []
        for r, (s, recs) in zip(runs, loaded):
            kind = kind_of_run(r)
            rows = _body(s, _primary_rows(s, recs, kind)) if kind else []
            v = np.array([np.nan if x[metric] is None else x[metric] for x in rows], dtype=np.float64)
            out.append(v[np.isfinite(v)])
        return out

    def boxes(ax, data, title, scale=None):
        shown = [d if d.size else np.array([np.nan]) for d in data]
        ax.boxplot(shown, positions=pos, widths=0.6, whis=(5, 95), showfliers=False)
        for i, d in enumerate(data):
            if d.size:
                jitter = np.random.default_rng(i).uniform(-0.18, 0.18, d.size)
                ax.plot(pos[i] + jitter, d, ".", ms=2, alpha=0.35, color=f"C{i}")
        ax.set_xticks(pos)
        ax.set_xticklabels(labels, rotation=20 if n > 3 else 0, fontsize=8)
        ax.set_title(title, fontsize=10)
        if scale == "symlog":
            allv = np.concatenate([d for d in data if d.size]) if any(d.size for d in data) else np.array([1.0])
            small = np.abs(allv[allv != 0])
            ax.set_yscale("symlog", linthresh=float(np.percentile(small, 10)) if small.size else 1e-3)
            ax.axhline(0, color="k", lw=0.6)
        elif scale == "log":
            ax.set_yscale("log")

    kind = lambda r: r["kind"]  # noqa: E731
    boxes(axes[0, 0], values(kind, "rsi"), "RSI of the full-batch gradient (body; box 25-75 %, whiskers 5-95 %)", "symlog")
    for i, r in enumerate(runs):
        if r["mu"] is not None:
            axes[0, 0].plot([pos[i] - 0.3, pos[i] + 0.3], [r["mu"]] * 2, color="C3", lw=1.5, label="mu = min" if i == 0 else None)
    axes[0, 0].legend(fontsize=8, loc="best")
    boxes(axes[0, 1], values(kind, "eb"), "EB of the full-batch gradient (body)", "log")
    for i, r in enumerate(runs):
        if r["L"] is not None:
            axes[0, 1].plot([pos[i] - 0.3, pos[i] + 0.3], [r["L"]] * 2, color="C3", lw=1.5, label="L = max" if i == 0 else None)
    axes[0, 1].legend(fontsize=8, loc="best")
    ax = axes[1, 0]
    boxes(ax, values(lambda r: "minibatch", "cos"), "cos of the minibatch gradient with x - x* vs the chance scale")
    for i, r in enumerate(runs):
        if r["chance_cos"]:
            ax.plot([pos[i] - 0.3, pos[i] + 0.3], [r["chance_cos"]] * 2, color="k", ls="--", lw=1.2,
                    label="1/sqrt(D)" if i == 0 else None)
    ax.axhline(0, color="grey", lw=0.6)
    ax.legend(fontsize=8, loc="best")
    ax = axes[1, 1]
    for i, (r, (s, recs)) in enumerate(zip(runs, loaded)):
        steps, c, lrs = distances(s, recs)
        if not steps:
            continue
        ax.plot(steps, np.sqrt(c), color=f"C{i}", lw=1.5, label=f"{r['label']}: actual")
        env = envelope(steps, c, lrs, r["mu"], r["L"])
        if env:
            ax.plot(steps, env, color=f"C{i}", lw=1.2, ls="--", label=f"{r['label']}: envelope")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("||x_t - x*||: actual (solid), envelope of mu, L at the lr used (dashed)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.suptitle("; ".join(f"{r['label']}: D={r['numel']:,}" if r["numel"] else r["label"] for r in runs), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
