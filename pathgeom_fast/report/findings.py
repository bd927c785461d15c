"""findings.md: the paper's claims, each checked against one run's summary.

Every number and verdict is computed here from the summary (:func:`pathgeom_fast.report.summarize`
plus the demo's extra fields); nothing is canned. Each claim states its criterion beside the
verdict, so a reader who prefers another threshold can re-judge from the same numbers. The
claims (Guille-Escuret et al., "No Wrong Turns", ICML 2024):

1. RSI stays positive for full-batch gradients along the path (min RSI over the body > 0).
2. Minibatch gradients point toward x*: share of training steps with cos > 0 (criterion: at
   least 90 %; a random direction gives 50 %, with |cos| of order 1/sqrt(D)).
3. EB is bounded and stable: the full-batch EB over the body varies by at most 10x between
   its 5th and 95th percentiles.
4. eta* looks like a warm-up-then-decay schedule: the running median (an eighth of the body
   wide) of the training minibatch's eta* rises by at least 1.5x to its peak and falls by at
   least 1.5x after it.
5. The implied contraction rate: with mu = min RSI > 0 and L = max EB, steps of mu / L^2
   contract ||x - x*||^2 by 1 - mu^2 / L^2 per step; compared with the path's own rate.

Then the lagged orthogonal cosine by lag, and the controls: the chance scale, the same claims
against a second seed's end point x*' and against x_0, the weight-decay variants, and the
replay divergence. "The body" is the path without its last ``tail_fraction`` (x ~ x*).

No verdict is read from too little or from undefined data: a claim needs at least
``MIN_VERDICT_STEPS`` measured steps with finite values in the body ("too few measured steps
(n) for a verdict" otherwise), and none from a run whose statistics went NaN or inf ("no
verdict: the run went non-finite"); rows whose ratios are undefined are counted and their steps
named beside the numbers, which are those of the finite rows. A summary may say how its
producer lets a user measure what is missing (``how_to_measure``: {"full": ..., "lags": ...},
e.g. the command-line flags); the default names the Python arguments.
"""

from __future__ import annotations

import math

import numpy as np

# What the summaries and plots call each reference point (summary.py and figures.py use these too).
REFERENCE_LABELS = {"xstar": "x* (end of run 1)", "x0": "x_0 (start of the path)"}


def reference_label(name: str) -> str:
    if name.startswith("xstar_seed"):
        return f"x*' (end of a run with seed {name[len('xstar_seed'):]})"
    return REFERENCE_LABELS.get(name, name)

def reference_block(summary: dict, name: str) -> dict:
    """overall, steps and path of a summary against reference ``name``. The primary
    reference's are the summary's top level (its ``by_reference`` entry says
    ``{"at_top_level": true}`` instead of holding a second copy); the others' are in
    ``by_reference``. An unknown name gives empty blocks."""
    block = summary.get("by_reference", {}).get(name) or {}
    if block.get("at_top_level") or (not block and name == summary.get("primary_reference")):
        return {k: summary.get(k) or {} for k in ("overall", "steps", "path")}
    return {k: block.get(k) or {} for k in ("overall", "steps", "path")}


HOLDS, FAILS, UNMEASURED, NO_VERDICT = "holds", "does not hold here", "not measured", "no verdict"
#: a verdict needs at least this many measured steps with finite values in the body
MIN_VERDICT_STEPS = 8
#: how to measure what is missing, in the words of the Python API (producers may override)
HOW_TO_MEASURE = {"full": "full_batch= was not given", "lags": "lags= was not given, or too few steps for any lag"}
COS_SHARE_MIN = 0.9
EB_SPREAD_MAX = 10.0
ETA_RISE_MIN = 1.5
LAG_CORRELATED = 0.05


def _g(v, p: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, (int, np.integer)):
        return f"{v:,}"
    return f"{v:.{p}g}"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def _ratio(v) -> float | None:
    """A number of the summary; summary.json stores NaN and inf as the strings "NaN", "inf", "-inf"."""
    return None if v is None else float(v)


def _nonfinite_label(v: float) -> str:
    return "NaN" if math.isnan(v) else "inf" if v > 0 else "-inf"


def _steps(steps: list) -> str:
    """'step 4' / 'steps 4, 5, 6 ...'"""
    steps = list(steps or [])
    more = " ..." if len(steps) > 6 else ""
    return f"step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps[:6]))}{more}"


def _how(summary: dict, what: str) -> str:
    return {**HOW_TO_MEASURE, **(summary.get("how_to_measure") or {})}[what]


def _undefined(b: dict, rows: str = "rows", cos: bool = False) -> str:
    """'; 5 of 9 rows undefined (NaN or inf) at steps 4, 5, ..., left out' or ''."""
    n_bad = b["n"] - b["n_cos"] if cos and "n_cos" in b else b.get("n_undefined", 0)
    if not n_bad:
        return ""
    steps = b.get("cos_undefined_steps" if cos else "undefined_steps") or []
    return f"; {n_bad} of {b['n']} {rows} undefined (NaN or inf){' at ' + _steps(steps) if steps else ''}, left out"


def _gate(summary: dict, kind: str, n_defined: int) -> str | None:
    """Why there is no verdict from the rows of ``kind``, or None: statistics that went NaN or inf
    anywhere on the path (the tail included), or too few measured steps with finite values."""
    per_step = summary.get("steps", {}).get(kind, [])
    bad = [s["step"] for s in per_step if s.get("n_nonfinite")]
    if bad:
        n_rows = sum(s["n"] for s in per_step)
        n_bad = sum(s["n_nonfinite"] for s in per_step)
        return f"no verdict: the run went non-finite ({n_bad} of {n_rows} rows have NaN or inf statistics, from {_steps(bad)})"
    if n_defined < MIN_VERDICT_STEPS:
        return f"too few measured steps ({n_defined}) for a verdict (at least {MIN_VERDICT_STEPS} with finite values are needed)"
    return None


def _body(summary: dict):
    cut = summary.get("overall_steps_below")
    return (lambda s: s < cut) if cut is not None else (lambda s: True)


def _cut(summary: dict) -> int | None:
    """The first step of the tail, as an integer (steps are integers)."""
    cut = summary.get("overall_steps_below")
    return None if cut is None else int(math.ceil(cut))


def _per_step(summary: dict, kind: str, metric: str, q: str = "q50", ref: str | None = None) -> tuple[list, list]:
    """(steps, values) of one quantile of one metric over the body's measured steps."""
    steps = summary["steps"] if ref is None else reference_block(summary, ref)["steps"]
    inside = _body(summary)
    pts = [(s["step"], s[metric][q]) for s in steps.get(kind, []) if inside(s["step"]) and s[metric][q] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _others(summary: dict) -> list[str]:
    return [n for n in summary.get("by_reference", {}) if n != summary.get("primary_reference")]


def _block(summary: dict, ref: str, kind: str) -> dict | None:
    return reference_block(summary, ref)["overall"].get(kind)


def claim_rsi_full(summary: dict) -> dict:
    full = summary["overall"].get("full")
    out = {"claim": "RSI stays positive for full-batch gradients along the path",
           "criterion": "min RSI of the full-batch gradient over the body > 0"}
    if not full:
        return {**out, "measured": f"no full-batch gradient was measured ({_how(summary, 'full')})", "verdict": UNMEASURED,
                "controls": []}
    steps, lows = _per_step(summary, "full", "rsi", "q0")
    bad = [s for s, v in zip(steps, lows) if v is not None and math.isfinite(v) and v <= 0]
    all_lows = [s["rsi"]["q0"] for s in summary["steps"]["full"] if s["rsi"]["q0"] is not None and s["rsi"]["q0"] == s["rsi"]["q0"]]
    measured = (f"min RSI {_g(full['mu'])}, median {_g(full['rsi']['q50'])}; RSI > 0 at {_pct(full['share_cos_positive'])} "
                f"of {full.get('n_cos', full['n'])} full-batch measurements{_undefined(full, 'measurements', cos=True)}")
    if bad:
        measured += f"; RSI <= 0 at step{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad[:6]))}{' ...' if len(bad) > 6 else ''}"
    if all_lows and min(all_lows) != full["mu"]:
        measured += f" (with the tail: min {_g(min(all_lows))})"
    controls = []
    for name in _others(summary):
        b = _block(summary, name, "full")
        if b:
            controls.append(f"against {reference_label(name)}: min RSI {_g(b['mu'])}, median {_g(b['rsi']['q50'])}, "
                            f"RSI > 0 at {_pct(b['share_cos_positive'])}")
    if "full_wd" in summary["overall"]:
        b = summary["overall"]["full_wd"]
        controls.append(f"weight-decay variant g + wd x (full_wd): min RSI {_g(b['mu'])}, RSI > 0 at {_pct(b['share_cos_positive'])}")
    gate = _gate(summary, "full", full.get("n_steps_defined", full["n"]))
    if gate:
        return {**out, "measured": f"{gate}; {measured}", "verdict": NO_VERDICT, "controls": controls}
    ok = full["mu"] is not None and full["mu"] > 0
    return {**out, "measured": measured, "verdict": HOLDS if ok else FAILS, "controls": controls}


def claim_cos_minibatch(summary: dict) -> dict:
    mb = summary["overall"].get("minibatch")
    chance = summary.get("chance_cos")
    out = {"claim": "minibatch gradients point toward x* at most steps (cos > 0)",
           "criterion": f"share of training steps with cos > 0 >= {COS_SHARE_MIN:.0%} (a random direction: 50 %)"}
    if not mb:
        return {**out, "measured": "no minibatch rows", "verdict": UNMEASURED, "controls": []}
    med = mb["cos"]["q50"]
    n_cos = mb.get("n_cos", mb["n"])
    measured = (f"cos > 0 at {_pct(mb['share_cos_positive'])} of {n_cos} training steps{_undefined(mb, 'steps', cos=True)}; "
                f"median cos {_g(med)}")
    if chance and med is not None:
        measured += f" = {med / chance:,.0f} x the chance scale 1/sqrt(D) = {_g(chance)}"
    controls = []
    pr = summary["overall"].get("probe")
    if pr:
        controls.append(f"fixed probe minibatches: cos > 0 at {_pct(pr['share_cos_positive'])} of {pr['n']}, median {_g(pr['cos']['q50'])}")
    for name in _others(summary):
        b = _block(summary, name, "minibatch")
        if b:
            controls.append(f"against {reference_label(name)}: cos > 0 at {_pct(b['share_cos_positive'])}, median cos {_g(b['cos']['q50'])}")
    if "minibatch_wd" in summary["overall"]:
        b = summary["overall"]["minibatch_wd"]
        controls.append(f"weight-decay variant (minibatch_wd): cos > 0 at {_pct(b['share_cos_positive'])}")
    gate = _gate(summary, "minibatch", n_cos)
    if gate:
        return {**out, "measured": f"{gate}; {measured}", "verdict": NO_VERDICT, "controls": controls}
    ok = mb["share_cos_positive"] is not None and mb["share_cos_positive"] >= COS_SHARE_MIN
    return {**out, "measured": measured, "verdict": HOLDS if ok else FAILS, "controls": controls}


def _eb_kind(summary: dict) -> str | None:
    return next((k for k in ("full", "probe", "minibatch") if k in summary["overall"]), None)


def claim_eb(summary: dict) -> dict:
    kind = _eb_kind(summary)
    out = {"claim": "EB is bounded and stable along the path",
           "criterion": f"95th / 5th percentile of the per-step EB over the body <= {EB_SPREAD_MAX:g}"}
    if kind is None:
        return {**out, "measured": "no rows", "verdict": UNMEASURED, "controls": []}
    steps, vals = _per_step(summary, kind, "eb")
    v = np.array(vals, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    block = summary["overall"][kind]
    gate = _gate(summary, kind, int(v.size))
    if gate and v.size < 2:
        return {**out, "measured": f"{gate}; {v.size} {kind} measurement(s) with a finite EB in the body", "verdict": NO_VERDICT,
                "controls": []}
    lo, hi = np.percentile(v, 5), np.percentile(v, 95)
    spread = hi / lo
    q = max(1, v.size // 4)
    drift = float(np.median(v[-q:]) / np.median(v[:q]))
    what = {"full": "full-batch", "probe": "probe-median", "minibatch": "training-minibatch"}[kind]
    measured = (f"{what} EB over {v.size} steps: max L = {_g(float(v.max()))}, median {_g(float(np.median(v)))}, 5-95 % range "
                f"{_g(lo)} to {_g(hi)} (x{spread:.3g}); last quarter / first quarter of the body: x{drift:.3g}"
                + _undefined(block))
    all_max = max((s["eb"]["q100"] for s in summary["steps"][kind] if s["eb"]["q100"] is not None and math.isfinite(s["eb"]["q100"])),
                  default=None)
    controls = []
    if all_max is not None and all_max > v.max():
        controls.append(f"with the tail (x ~ x*, c -> 0) EB reaches {_g(all_max)}: the bound holds only away from x*")
    if kind != "minibatch" and "minibatch" in summary["overall"]:
        b = summary["overall"]["minibatch"]
        controls.append(f"training minibatch EB: median {_g(b['eb']['q50'])}, max {_g(b['L'])} (noise adds to ||g||)")
    if gate:
        return {**out, "measured": f"{gate}; {measured}", "verdict": NO_VERDICT, "controls": controls}
    return {**out, "measured": measured, "verdict": HOLDS if spread <= EB_SPREAD_MAX else FAILS, "controls": controls}


def _running_median(v: np.ndarray, w: int) -> np.ndarray:
    h = w // 2
    return np.array([np.median(v[max(0, i - h) : i + h + 1]) for i in range(len(v))])


def claim_eta(summary: dict) -> dict:
    # the training minibatch's eta* (measured every step), else the probes' median, else the full batch
    kind = next((k for k in ("minibatch", "probe", "full") if k in summary["overall"]), None)
    out = {"claim": "eta* is shaped like a warm-up then decay schedule",
           "criterion": f"running median of eta* over the body rises >= {ETA_RISE_MIN:g}x to a peak, then falls >= {ETA_RISE_MIN:g}x"}
    if kind is None:
        return {**out, "measured": "no rows", "verdict": UNMEASURED, "controls": []}
    steps, vals = _per_step(summary, kind, "eta_star")
    pts = [(s, v) for s, v in zip(steps, vals) if math.isfinite(v)]
    gate = _gate(summary, kind, len(pts))
    if gate and len(pts) < 3:
        return {**out, "measured": f"{gate}; {len(pts)} {kind} measurement(s) of eta* in the body", "verdict": NO_VERDICT,
                "controls": []}
    s = np.array([p[0] for p in pts])
    w = max(3, len(pts) // 8) | 1  # odd window, an eighth of the body
    v = _running_median(np.array([p[1] for p in pts]), w)
    i = int(np.argmax(v))
    start, peak, end = v[0], v[i], v[-1]
    rises = peak > 0 and (start <= 0 or peak >= ETA_RISE_MIN * start)
    falls = peak > 0 and (end <= 0 or peak >= ETA_RISE_MIN * end)

    def factor(hi, lo):
        return f"{hi / lo:.3g}x" if lo > 0 else "from <= 0"

    what = {"probe": "probe-median", "full": "full-batch", "minibatch": "training-minibatch"}[kind]
    measured = (f"{what} eta*, running median over {w} of {len(pts)} steps: {_g(start)} at step {s[0]}, peak {_g(peak)} at "
                f"step {s[i]}, {_g(end)} at step {s[-1]}: "
                + (f"no rise (the peak is at the start), then it falls {factor(peak, end)}" if i == 0 else
                   f"it rises {factor(peak, start)}, then falls {factor(peak, end)}"))
    controls = []
    if kind != "probe" and "probe" in summary["overall"]:
        ps, pv = _per_step(summary, "probe", "eta_star")
        if len(pv) >= 2:
            j = int(np.nanargmax(pv))
            controls.append(f"probe-median eta*: {_g(pv[0])} at step {ps[0]}, largest {_g(pv[j])} at step {ps[j]}, {_g(pv[-1])} at step {ps[-1]}")
    st = summary.get("step_size")
    if st:
        per_g, over = st["step_per_unit_gradient"]["q50"], st["eta_star_over_step"]["q50"]
        controls.append(f"step taken per unit gradient ||u|| / ||g|| (u = x_t - x_t+1, g the minibatch gradient before clipping): "
                        f"median {_g(per_g)}; eta* of the same g / that step: median {_g(over)}")
        if summary.get("lr_comparable_to_eta_star", True) and st["eta_star_over_lr"]["q50"] is not None:
            controls.append(f"eta* / learning rate: median {_g(st['eta_star_over_lr']['q50'])}")
        elif not summary.get("lr_comparable_to_eta_star", True):
            controls.append(f"{summary.get('optimizer', 'this optimizer')}: the learning rate scales a preconditioned step, not g, "
                            "so eta* is compared with ||u|| / ||g|| rather than with lr")
    if gate:
        return {**out, "measured": f"{gate}; {measured}", "verdict": NO_VERDICT, "controls": controls}
    return {**out, "measured": measured, "verdict": HOLDS if rises and falls else FAILS, "controls": controls}


def claim_rate(summary: dict) -> dict:
    kind = next((k for k in ("full", "probe") if k in summary["overall"]), None)
    out = {"claim": "the implied contraction rate 1 - mu^2/L^2 (steps of mu/L^2)",
           "criterion": "a contraction is guaranteed: mu = min RSI > 0 over the body"}
    if kind is None:
        return {**out, "measured": "no full-batch or probe rows", "verdict": UNMEASURED, "controls": []}
    b = summary["overall"][kind]
    mu, L = b["mu"], b["L"]
    path = summary.get("path") or {}
    obs, obs_half = path.get("observed_rate"), path.get("observed_steps_to_halve")
    what = "full-batch" if kind == "full" else "probe"
    measured = f"{what}: mu = {_g(mu)}, L = {_g(L)}{_undefined(b)}"
    gate = _gate(summary, kind, b.get("n_steps_defined", b["n"]))
    controls = []
    if obs is not None:
        controls.append(f"the path itself: ||x - x*||^2 changed by a factor {_g(obs, 6)} per step on average over steps "
                        f"{path['first_step']}-{path['last_step']}" + (f" (halved every {_g(obs_half)} steps)" if obs_half else ""))
    if gate:
        if mu is not None and mu <= 0:
            measured += "; mu <= 0: no guarantee"
        return {**out, "measured": f"{gate}; {measured}", "verdict": NO_VERDICT, "controls": controls}
    if mu is not None and L and mu > 0:
        rate = 1 - mu * mu / (L * L)
        half = math.log(0.5) / math.log(rate) if 0 < rate < 1 else None
        measured += f"; rate {_g(rate, 6)} per step of size mu/L^2 = {_g(mu / L ** 2)}" + (f" (halves ||x - x*||^2 in {_g(half)} steps)" if half else "")
        if half and obs_half:
            controls.append(f"the guarantee is {half / obs_half:,.3g}x slower than the path's own contraction")
        return {**out, "measured": measured, "verdict": HOLDS, "controls": controls}
    if mu is None:
        measured += "; no finite RSI, so no rate"
        return {**out, "measured": measured, "verdict": NO_VERDICT, "controls": controls}
    measured += "; rate: no guarantee (mu <= 0: steps of mu/L^2 guarantee no contraction)"
    return {**out, "measured": measured, "verdict": FAILS, "controls": controls}


def lagged_lines(summary: dict) -> list[str]:
    lag = summary.get("lagged") or {}
    if not lag:
        return [f"Not measured ({_how(summary, 'lags')})."]
    chance = summary.get("chance_cos")
    lines = ["| lag k | anchors | median cos | 25-75 % | share > 0 | reading |", "| ---: | ---: | ---: | --- | ---: | --- |"]
    for k, b in lag.items():
        med = b["cos"]["q50"]
        reading = ("correlated (the orthogonal part persists)" if med is not None and med > LAG_CORRELATED
                   else "anti-correlated (zig-zag across x - x*)" if med is not None and med < -LAG_CORRELATED
                   else f"uncorrelated (|median| <= {LAG_CORRELATED:g})")
        lines.append(f"| {k} | {b['n']} | {_g(med)} | {_g(b['cos']['q25'])} to {_g(b['cos']['q75'])} | {_pct(b['share_positive'])} | {reading} |")
    if chance:
        lines.append("")
        lines.append(f"Chance scale of a cosine in D = {summary['numel']:,} dimensions: 1/sqrt(D) = {_g(chance)}.")
    return lines


def control_lines(summary: dict) -> list[str]:
    lines = []
    chance = summary.get("chance_cos")
    if chance:
        lines.append(f"- **Chance scale**: two random directions in D = {summary['numel']:,} dimensions have |cos| ~ "
                     f"1/sqrt(D) = {_g(chance)}; positive half of the time.")
    primary = summary.get("primary_reference")
    d0 = reference_block(summary, primary)["path"].get("distance_first")
    ratios = summary.get("final_distance_ratios") or {}
    cross = summary.get("cross_seed")
    for name in _others(summary):
        p = reference_block(summary, name)["path"]
        mb, full = _block(summary, name, "minibatch"), _block(summary, name, "full")
        parts = []
        if name.startswith("xstar_seed"):
            head = f"- **Cross-seed reference** {reference_label(name)}"
            if cross:
                head += f" (its run: final loss {_g(cross.get('final_train_loss'))}, accuracy {_g(cross.get('final_train_accuracy'))})"
        elif name == "x0":
            head = "- **x_0 as the reference** (the start of the path)"
        else:
            head = f"- **Reference {name}**"
        if p.get("distance_first") is not None and d0 and name != "x0":
            parts.append(f"||x_0 - ref|| = {_g(p['distance_first'])} (||x_0 - x*|| = {_g(d0)})")
        if name in ratios and name != "x0":
            v = _ratio(ratios[name])
            parts.append(f"the path ends at {_g(v)} of its starting distance from it" if math.isfinite(v) else
                         f"the path's final distance ratio to it is {_nonfinite_label(v)}")
        if full:
            parts.append(f"full-batch RSI > 0 at {_pct(full['share_cos_positive'])} (min {_g(full['mu'])})")
        if mb:
            parts.append(f"minibatch cos > 0 at {_pct(mb['share_cos_positive'])} (median {_g(mb['cos']['q50'])})")
        lines.append(head + ": " + "; ".join(parts) + ".")
    if summary.get("replay_final_distance_ratio") is not None:
        r = _ratio(summary["replay_final_distance_ratio"])
        if not math.isfinite(r):
            lines.append(f"- **Replay divergence**: ||x_T - x*|| / ||x_0 - x*|| is {_nonfinite_label(r)}: not a replay "
                         f"({_nonfinite_label(r)}); the run's "
                         "distances to x* are not finite numbers, so it is not known whether it retraced run 1.")
        else:
            lines.append(f"- **Replay divergence**: run 2 ended at {_g(r)} of its starting distance from x* "
                         + ("(an exact replay: every row is measured on run 1's own path)." if r == 0 else
                            "(the replay drifted: rows late in the path are measured on a slightly different path)."
                            if r > 1e-4 else "(the replay ended at x* to rounding)."))
    return lines


CLAIMS = (claim_rsi_full, claim_cos_minibatch, claim_eb, claim_eta, claim_rate)


def findings_markdown(summary: dict, title: str = "") -> str:
    """The findings.md text for one summary."""
    claims = [c(summary) for c in CLAIMS]
    cut = _cut(summary)
    out = [f"# Findings{': ' + title if title else ''}", ""]
    ratio = _ratio(summary.get("replay_final_distance_ratio"))
    how = ("the end of run 1, replayed exactly in run 2" if ratio == 0 else
           f"the reference point; not a replay ({_nonfinite_label(ratio)}): the run's distance to x* is not finite"
           if ratio is not None and not math.isfinite(ratio) else
           "the end of run 1, replayed in run 2" if ratio is not None else "the reference point")
    intro = f"Measured against x* ({how}), in D = {_g(summary.get('numel'))} parameters."
    if cut is not None:
        intro += (f" \"The body\" is the path before step {cut}: the last {summary['tail_fraction']:.0%} of the steps, where "
                  "x is so close to x* that the ratios are ill-conditioned, is left out.")
    intro += (f" A verdict needs at least {MIN_VERDICT_STEPS} measured steps with finite values in the body, and none "
              "is given from a run whose statistics went NaN or inf.")
    out += [intro, "", "| # | claim of the paper | measured here | criterion | verdict |", "| --- | --- | --- | --- | --- |"]
    for i, c in enumerate(claims, 1):
        out.append(f"| {i} | {c['claim']} | {c['measured']} | {c['criterion']} | **{c['verdict']}** |")
    out.append("")
    for i, c in enumerate(claims, 1):
        if c["controls"]:
            out.append(f"**{i}. {c['claim']}** ({c['verdict']}): beside it,")
            out += [f"- {x}" for x in c["controls"]]
            out.append("")
    out += ["## Lagged orthogonal cosine", "",
            "Cosine between the components of g_t and g_t+k orthogonal to their own x - x* (training minibatch "
            "gradients; anchors t and t + k in the body).", ""]
    out += lagged_lines(summary)
    out += ["", "## Controls", ""]
    out += control_lines(summary) or ["(none measured)"]
    out.append("")
    return "\n".join(out)
