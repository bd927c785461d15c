"""Independent fp64 recomputations for the integration tests (torch.cat of flattened copies)."""

from __future__ import annotations

import math
import statistics
import warnings

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook


def flat(ts) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in ts])


def geo(g: torch.Tensor, x: torch.Tensor, r: torch.Tensor) -> dict[str, float]:
    """rsi, eb, cos, eta* of the flat fp64 vectors g, x, x*."""
    d = x - r
    a, b, c = float(g @ d), float(g @ g), float(d @ d)
    return {"rsi": a / c, "eb": math.sqrt(b / c), "cos": a / math.sqrt(b * c), "eta_star": a / b}


def probe_summary(gs, x, r) -> dict[str, float]:
    """What the integrations log for K probe gradients: medians, min rsi/cos, max eb."""
    per = [geo(g, x, r) for g in gs]
    out = {k: statistics.median(p[k] for p in per) for k in ("rsi", "eb", "cos", "eta_star")}
    out.update(rsi_min=min(p["rsi"] for p in per), cos_min=min(p["cos"] for p in per), eb_max=max(p["eb"] for p in per))
    out["_eb_range"] = (min(p["eb"] for p in per), max(p["eb"] for p in per))
    return out


def assert_metrics(got, prefix: str, want: dict, what: str, rel: float = 1e-5) -> None:
    """got[prefix + k] against want[k] (from geo/probe_summary) within DESIGN.md's error model:
    |a_err| <= rel sqrt(b c) and b, c relative, i.e. rsi within rel * EB, cos within rel,
    eta* within rel / EB, EB relative (plus rel times the value)."""
    lo, hi = want.get("_eb_range", (want["eb"], want["eb"]))
    for k, v in want.items():
        if k.startswith("_"):
            continue
        g = got[prefix + k]
        if k.startswith("rsi"):
            tol = rel * (abs(v) + hi)
        elif k.startswith("cos"):
            tol = rel * (abs(v) + 1)
        elif k.startswith("eta"):
            tol = rel * (abs(v) + 1 / lo)
        else:
            tol = rel * abs(v)
        assert abs(g - v) <= tol, f"{what} {prefix}{k}: {g!r} vs fp64 {v!r} (tolerance {tol:.2e})"


def perturbed_reference(model, path, seed=0, scale=0.05) -> torch.Tensor:
    """Write x* = the model's parameters plus noise to `path` (safetensors, by name); return x* flat."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    state = {n: (p.detach() + scale * torch.randn(p.shape, generator=gen)).contiguous() for n, p in model.named_parameters()}
    save_file(state, str(path))
    return flat(state[n] for n, _ in model.named_parameters())


def grad_of(model, loss) -> torch.Tensor:
    """Flat fp64 gradient of `loss` w.r.t. the model's parameters, leaving .grad alone."""
    return flat(torch.autograd.grad(loss, list(model.parameters())))


def assert_close(got: float, want: float, what: str, rel: float = 1e-5) -> None:
    assert got == want or math.isclose(got, want, rel_tol=rel, abs_tol=1e-9), f"{what}: {got!r} vs fp64 {want!r}"


class Warnings:
    """Record every warning raised inside the block (all of them, not only the first)."""

    def __enter__(self):
        self._cm = warnings.catch_warnings(record=True)
        self.list = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)

    def matching(self, text: str) -> list[str]:
        return [str(w.message) for w in self.list if text in str(w.message)]


class PreClipCapture:
    """Capture, with public torch hooks only, what an optimizer step starts from: the parameters
    x_t and the accumulated gradient g_t as autograd left it, before any clipping.

    ``register_post_accumulate_grad_hook`` keeps a copy of each parameter's .grad after every
    backward (the last one of an accumulation cycle is the full, unclipped g_t); a global optimizer
    step pre-hook fires on each real optimizer step over these parameters and records
    ``on_step(params)`` (x_t, g_t, whatever it returns). Frameworks may clip however they like
    in between (torch.nn.utils.clip_grad_norm_, get_total_norm + clip_grads_with_norm_, their
    own code): nothing here depends on how.
    """

    def __init__(self, model, on_step=None):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.on_step = on_step
        self.captured = []
        self._grads = {}
        self._handles = []

    def __enter__(self):
        for p in self.params:
            self._handles.append(p.register_post_accumulate_grad_hook(self._keep))
        self._handles.append(register_optimizer_step_pre_hook(self._pre_step))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _keep(self, p):
        self._grads[p] = p.grad.detach().clone()

    def _pre_step(self, optimizer, args, kwargs):
        mine = {id(p) for p in self.params}
        if not any(id(p) in mine for group in optimizer.param_groups for p in group["params"]):
            return None
        x = flat(self.params)
        g = flat(self._grads[p] for p in self.params)
        with torch.enable_grad():
            extra = self.on_step(self.params) if self.on_step is not None else None
        self.captured.append((x, g) if extra is None else (x, g, *extra))
        return None


def capture_logger():
    """A Lightning logger that keeps every (step, metrics) that log_metrics receives in .rows."""
    from lightning.pytorch.loggers import Logger

    class Capture(Logger):
        def __init__(self):
            super().__init__()
            self.rows = []

        @property
        def name(self):
            return "capture"

        @property
        def version(self):
            return 0

        def log_hyperparams(self, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, dict(metrics)))

    return Capture()
