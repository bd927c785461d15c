"""The update rows of a :class:`~pathgeom_fast.path.tracker.PathTracker`: u = x_t - x_{t+1},
the step the optimizer really took, from the SGD / momentum identities (nothing extra kept)
or from one copy of the parameters, and the check of the identity-derived rows when they are
read (see the tracker module's documentation).

A mixin of ``PathTracker`` (never imported from here): it reads the tracker's state
(``_pending`` as :meth:`~pathgeom_fast.path.gradient_rows.GradientRows.measure` left it,
``_copy``, ``_ref_norms``, the epsilons) and queues rows with ``_add``.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch

from ..ops.wrappers import secant_stats

if TYPE_CHECKING:  # annotations only
    from ..checkpoints.reference import Reference

Tensor = torch.Tensor


class UpdateRows:
    """``update`` rows: the mode (identity or copy), :meth:`after_step` and the identity check."""

    def _update_mode(self, update: str) -> str:
        if update == "off" or self.optimizer is None:
            return "off"
        if update == "copy":
            return "copy"
        opt = self.optimizer
        if type(opt) is torch.optim.SGD and not any(g.get("maximize") or g.get("nesterov") for g in opt.param_groups):
            return "sgd" if all(g.get("momentum", 0) == 0 for g in opt.param_groups) else "momentum"
        return "copy"

    def _groups(self) -> list[tuple[dict, list[int]]]:
        """Optimizer param groups as index lists into self.params."""
        pos = {id(p): i for i, p in enumerate(self.params)}
        return [(g, [pos[id(p)] for p in g["params"] if id(p) in pos]) for g in self.optimizer.param_groups]

    @torch.no_grad()
    def after_step(self) -> None:
        """Record the update u = x_t - x_{t+1}: call right after ``optimizer.step()``."""
        pend, self._pending = self._pending, None
        if pend is None:
            raise RuntimeError("PathTracker.after_step() called without measure() before the step")
        mode = pend["mode"]
        if mode == "off":
            return
        for name, ref in self.refs.items():
            c = pend["c"][name]
            if mode == "copy":  # h = x_t - x_{t+1} = u via weight_decay = -1 on params = x_{t+1}
                s = secant_stats(self._copy, self.params, ref.tensors, weight_decay=-1.0, **self.kw)
                self._add(pend["step"], "update", name, torch.stack([s[0] + s[1], s[1], c]), pend["lr"], pend["loss"])
                continue
            a, b, c_next = self._identity_update(mode, pend, name, ref)
            tol = self._update_tolerance(name, ref, a, b, c, c_next)
            self._add(pend["step"], "update", name, torch.stack([a, b, c]), pend["lr"], pend["loss"],
                      check=torch.stack([c_next, tol]), hint=self._update_hint(pend))

    def _identity_update(self, mode: str, pend: dict, name: str, ref: Reference) -> tuple[Tensor, Tensor, Tensor]:
        """a = <u, x_t - x*>, b = ||u||^2 and c_next = ||x_{t+1} - x*||^2 from x_{t+1}, in one pass
        per param group: the parameters the optimizer moved (a ``.grad`` now) and, for c_next,
        one more pass over those it did not move."""
        a = b = c_next = None
        moved = [False] * len(self.params)
        for lr_g, wd_g, idx in pend["groups"]:
            idx = [i for i in idx if self.params[i].grad is not None]  # torch skips a parameter without .grad
            if not idx:
                continue
            for i in idx:
                moved[i] = True
            p, r = [self.params[i] for i in idx], [ref.tensors[i] for i in idx]
            if mode == "sgd":
                # x_{t+1} = x_t - lr (g + wd x_t)  =>  u = k (g + wd x_{t+1}), k = lr / (1 - lr wd)
                k = lr_g / (1.0 - lr_g * wd_g) if lr_g * wd_g != 1.0 else math.nan
                s = secant_stats([q.grad for q in p], p, r, weight_decay=wd_g, **self.kw)
            else:  # momentum: u = lr * buf, read after the step
                k = lr_g
                bufs = []
                for q in p:
                    buf = self.optimizer.state.get(q, {}).get("momentum_buffer")
                    bufs.append(buf if buf is not None else torch.zeros_like(q))
                s = secant_stats(bufs, p, r, **self.kw)
            # x_t = x_{t+1} + u:  <u, x_t - x*> = k <v, x_{t+1} - x*> + k^2 ||v||^2, u = k v
            ga, gb = k * s[0] + k * k * s[1], k * k * s[1]
            a, b, c_next = (ga, gb, s[2]) if a is None else (a + ga, b + gb, c_next + s[2])
        still = [i for i, m in enumerate(moved) if not m]
        if still:
            p, r = [self.params[i] for i in still], [ref.tensors[i] for i in still]
            cs = secant_stats(p, p, r, **self.kw)[2]
            c_next = cs if c_next is None else c_next + cs
        if a is None:
            a = b = torch.zeros_like(c_next)
        return a, b, c_next

    def _update_tolerance(self, name: str, ref: Reference, a: Tensor, b: Tensor, c: Tensor, c_next: Tensor) -> Tensor:
        """How far ||x_{t+1} - x*||^2 may be from c - 2a + b by rounding alone: the ops' error on
        a, b, c (and c_next), and x_{t+1} rounded to the parameters' dtype. That rounding moves
        x_{t+1} by delta, |delta_i| <= eps/2 |x_{t+1,i}|, so c - 2a + b = ||x_{t+1} - x* + delta||^2
        is off by 2 <x_{t+1} - x*, delta> + ||delta||^2 <= eps dn n + (eps n / 2)^2 with
        dn = ||x_{t+1} - x*|| and n = ||x_{t+1}|| <= dn + ||x*||. The second term is what is left
        when a replay's last step lands exactly on x* (dn = 0) with a tiny step; both are doubled
        here for margin."""
        if name not in self._ref_norms:
            self._ref_norms[name] = secant_stats(ref.tensors, ref.tensors, ref.tensors, **self.kw)[1].sqrt()
        dn = c_next.clamp(min=0).sqrt()
        n = dn + self._ref_norms[name]
        sizes = c + c_next + b + 2 * (b * c).clamp(min=0).sqrt()
        rounding = 2 * self._param_eps * dn * n + (self._param_eps * n) ** 2
        return 4 * self._kernel_eps * sizes + rounding + 1e-300

    def _update_hint(self, pend: dict) -> str:
        """What, seen from here, may have changed between measure() and the step."""
        now = [(float(g["lr"]), float(g.get("weight_decay", 0.0) or 0.0)) for g, _ in self._groups()]
        if now != [(lr, wd) for lr, wd, _ in pend["groups"]]:
            return "the learning rate or weight decay changed inside the measured step (a scheduler stepped before optimizer.step()?)"
        lost = sum(1 for p, had in zip(self.params, pend["had_grad"]) if had and p.grad is None)
        if lost:
            return f"{lost} parameter(s) lost their .grad inside the measured step (zero_grad() before after_step()?)"
        return ""

    def _checked_update(self, key: tuple, abc: list[float], check: list[float], hint: str) -> list[float]:
        """An identity-derived update row, or NaN a and b where ||x_{t+1} - x*||^2 is not
        c - 2a + b to rounding (warned once; the next measured step falls back to a copy)."""
        a, b, c = abc
        c_next, tol = check
        expect = c - 2 * a + b
        if not all(map(math.isfinite, (a, b, c, c_next))) or abs(c_next - expect) <= tol:
            return abc  # a run that went NaN/inf is not a mismatch of the identity
        self.update_mode = "copy"  # from the next measured step on (a pending step keeps its mode)
        if not self._update_warned:
            self._update_warned = True
            step, ref = key[0], key[3]
            likely = hint or (
                "the gradient changed between measure() and optimizer.step() in a way the optimizer's identity "
                "does not follow, parameters were changed inside the measured step (a projection or clamp), or "
                f"the optimizer ({type(self.optimizer).__name__}) does not take the plain SGD step the identities describe"
            )
            warnings.warn(
                f"PathTracker: the update row of step {step} (reference {ref!r}) does not match the step the parameters "
                f"took: ||x_t+1 - x*||^2 = {c_next:.9g} but c - 2a + b = {expect:.9g} (rounding allows {tol:.2g}). "
                f"Likely cause: {likely}. Its a, b and ratios are left undefined (NaN), as are those of any other "
                "mismatched update row; from the next measured step on, updates are the exact difference of the "
                "parameters (one copy of them is kept).",
                RuntimeWarning,
                stacklevel=4,
            )
        return [math.nan, math.nan, c]
