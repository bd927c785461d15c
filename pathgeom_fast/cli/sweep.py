"""``pathgeom sweep``: one demo task over a list of values of one setting, then the comparison.

Each value is a full two-run measurement (:func:`pathgeom_fast.demo.run_demo`) into its own
subfolder ``OUT/SETTING=VALUE``; then :func:`pathgeom_fast.compare.compare_runs` writes
``compare.json``, ``compare.md`` and ``compare.png`` to ``OUT``, and :func:`summary_line` says
how much mu, L, eta_opt and the final loss move across the sweep. Every configuration is
checked before the first run starts, so a bad value fails at once.
"""

from __future__ import annotations

import math
import os
import sys

from ..report import compare

#: the settings a sweep can vary (DemoConfig fields)
SWEEPABLE = ("lr", "init_scale", "seed", "weight_decay", "batch_size", "steps", "width", "depth", "train_size",
             "optimizer", "schedule", "clip_grad_norm")


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def folder_name(setting: str, value) -> str:
    return f"{setting}={_fmt(value)}"


def plan(base: dict, setting: str, values: list) -> list:
    """The DemoConfig of every run (ValueError on a bad setting, value or combination)."""
    from .demo import DemoConfig

    if setting not in SWEEPABLE:
        raise ValueError(f"cannot sweep {setting!r}: one of {', '.join(SWEEPABLE)}")
    if len(values) < 2:
        raise ValueError(f"a sweep over {setting} needs at least two values, got {len(values)}")
    names = [folder_name(setting, v) for v in values]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--{setting.replace('_', '-')} lists the same value twice: {', '.join(dup)}")
    out = base.get("out", "pathgeom-sweep")
    return [DemoConfig(**{**base, setting: v, "out": os.path.join(out, n), "progress": False}) for v, n in zip(values, names)]


def run_sweep(base: dict, setting: str, values: list, progress: bool = True) -> dict:
    """Run every configuration (a tqdm bar over the runs on stderr), then compare them into
    ``base['out']``. Returns compare.json's content with ``setting``, ``values`` and ``line``."""
    from tqdm.auto import tqdm

    from .demo import run_demo

    configs = plan(base, setting, values)
    out = base.get("out", "pathgeom-sweep")
    os.makedirs(out, exist_ok=True)
    bar = tqdm(list(zip(values, configs)), desc=f"sweep {setting}", unit="run", file=sys.stderr, disable=not progress)
    for value, cfg in bar:
        bar.set_postfix_str(f"{setting}={_fmt(value)}")
        run_demo(cfg)
    result = compare.compare_runs([c.out for c in configs], out, labels=[folder_name(setting, v) for v in values])
    result.update(setting=setting, values=list(values), line=summary_line(result, setting))
    return result


def _moves(name: str, vals: list) -> str:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return f"{name} not measured"
    lo, hi = min(vals), max(vals)
    text = f"{name} {lo:.3g}..{hi:.3g}"
    if lo > 0:
        text += f" ({hi / lo:.3g}x)"
    elif hi > 0:
        text += " (changes sign)"
    return text


def summary_line(result: dict, setting: str) -> str:
    """How much mu, L, eta_opt and the final loss move across the runs (min..max and max/min)."""
    runs = result["runs"]
    vals = ", ".join(r["label"].split("=", 1)[-1] for r in runs)
    parts = [_moves(k, [r[k] for r in runs]) for k in ("mu", "L", "eta_opt")]
    parts.append(_moves("final loss", [r["final_train_loss"] for r in runs]))
    return f"across {setting} = {vals}: " + "; ".join(parts)
