"""Derived path-geometry metrics from secant statistics (DESIGN.md section 1).

From a = <g, x - x*>, b = ||g||^2, c = ||x - x*||^2:

    RSI = a / c        EB = sqrt(b / c)        cos = a / sqrt(b c)
    eta* = a / b       contraction = 1 - cos^2   (= ||x - eta* g - x*||^2 / ||x - x*||^2)
    grad_norm = sqrt(b)   dist = sqrt(c)

A random direction in D dimensions has |cos| of order 1/sqrt(D) (``chance_cos``), the scale
against which a measured cosine is judged. Degenerate denominators give inf/nan, as in torch,
except the cosine: where g = 0 or x = x* (b c = 0) there is no angle, and cos (with the
contraction) is NaN, where a rounding-level a (it is 0 in exact arithmetic) would give +-inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Geometry:
    rsi: Tensor
    eb: Tensor
    cos: Tensor
    eta_star: Tensor
    contraction: Tensor
    grad_norm: Tensor
    dist: Tensor
    a: Tensor
    b: Tensor
    c: Tensor
    chance_cos: float | None = None

    def as_dict(self) -> dict:
        """Python floats (scalars) or lists, e.g. for JSON or CSV rows."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.tolist() if isinstance(v, Tensor) else v
        return out


def geometry(stats: Tensor, numel: int | None = None) -> Geometry:
    """Metrics of stats shaped [..., 3] ([3], [K, 3], [T, 3], [K, T, 3]).

    ``numel`` (D, the number of parameters) sets ``chance_cos = 1 / sqrt(D)``.
    """
    if not isinstance(stats, Tensor):
        stats = torch.as_tensor(stats, dtype=torch.float64)
    if stats.ndim == 0 or stats.shape[-1] != 3:
        raise ValueError(f"geometry: stats must have shape [..., 3] (a, b, c), got {list(stats.shape)}")
    s = stats.to(torch.float64)
    a, b, c = s[..., 0], s[..., 1], s[..., 2]
    cos = torch.where(b * c == 0, torch.nan, a / torch.sqrt(b * c))
    if numel is not None and numel <= 0:
        raise ValueError(f"geometry: numel must be positive, got {numel}")
    return Geometry(
        rsi=a / c,
        eb=torch.sqrt(b / c),
        cos=cos,
        eta_star=a / b,
        contraction=1.0 - cos * cos,
        grad_norm=torch.sqrt(b),
        dist=torch.sqrt(c),
        a=a,
        b=b,
        c=c,
        chance_cos=None if numel is None else 1.0 / math.sqrt(numel),
    )


def _div(x: float, y: float) -> float:
    """x / y with torch's semantics for zero denominators (inf or nan), without tensors."""
    if y != 0.0:
        return x / y
    return math.nan if x == 0.0 or math.isnan(x) else math.copysign(math.inf, x)


def metrics(a: float, b: float, c: float) -> dict[str, float]:
    """rsi, eb, cos, eta_star of one (a, b, c), in plain floats (pathgeom_fast.geometry's formulas)."""
    return {
        "rsi": _div(a, c),
        "eb": math.sqrt(_div(b, c)) if not (b < 0 or c < 0) else math.nan,
        "cos": _div(a, math.sqrt(b * c)) if b * c > 0 else math.nan,  # no angle at g = 0 or x = x*
        "eta_star": _div(a, b),
    }
