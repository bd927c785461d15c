"""The lagged rows of a :class:`~pathgeom_fast.path.tracker.PathTracker` (``lags=``): the
cosine between the orthogonal components g_t⊥ and g_{t+k}⊥ of an anchor step t and the step
t + k (see the tracker module's documentation for the formulas and the memory).

A mixin of ``PathTracker`` (never imported from here): it keeps the anchors in
``self._anchors`` and queues rows in ``self._blocks``.
"""

from __future__ import annotations

import torch

from .rows import _Block

Tensor = torch.Tensor

# secant_gram takes at most 8 vector lists: the gradient and 7 anchors per call
_GRAM_ANCHORS = 7


class LaggedRows:
    """``lagged`` rows: anchors every ``lag_every`` steps, one fused Gram pass per 7 anchors due."""

    @torch.no_grad()
    def _lagged(self, step: int, grads: list[Tensor], stats: Tensor, lr) -> None:
        """Rows ``lagged`` for the anchors due at this step, then this step's anchor (if any)."""
        ref = self.ref
        due = [(t, u, uu) for t, u, uu in self._anchors if step - t in self.lags]
        for i in range(0, len(due), _GRAM_ANCHORS):
            self._lagged_rows(step, grads, due[i : i + _GRAM_ANCHORS], lr)
        biggest = self.lags[-1]
        self._anchors = [an for an in self._anchors if step - an[0] < biggest]
        if step % self.lag_every == 0:
            a, b, c = stats[0], stats[1], stats[2]
            ratio = a / c
            u = []
            for g, p, r in zip(grads, self.params, ref.tensors):
                g_, p_, r_ = (g.to_local(), p.to_local(), r.to_local()) if self.sharded else (g, p, r)
                dt = torch.promote_types(torch.promote_types(p_.dtype, r_.dtype), torch.float32)
                v = torch.sub(p_.detach().to(dt), r_.to(dt))  # x - x* (at least fp32), then g - ratio (x - x*)
                v.mul_(-ratio)
                v = v.add_(g_).to(g_.dtype)  # secant_gram wants the vectors of one position in one dtype
                if self.sharded:
                    from ..checkpoints.sharding import _from_local

                    v = _from_local(v, p)
                u.append(v)
            self._anchors.append((step, u, b - a * a / c))

    def _lagged_rows(self, step: int, grads: list[Tensor], due: list, lr) -> None:
        from ..ops.wrappers import secant_gram

        ref = self.ref
        # Gram of (g_s, u_1..u_m, x_s - x*) in one fused pass; K = the index of x_s - x*
        G = secant_gram([grads] + [u for _, u, _ in due], self.params, ref.tensors, **self.kw)
        K = len(due) + 1
        a_s, b_s, c_s = G[0, K], G[0, 0], G[K, K]
        cross = G[0, 1:K] - (a_s / c_s) * G[1:K, K]  # <g_s perp, u_i> = <g_s, u_i> - (a_s / c_s) <x_s - x*, u_i>
        perp = (b_s - a_s * a_s / c_s).expand(K - 1)  # ||g_s perp||^2
        rows = torch.stack([cross, perp, torch.stack([uu for _, _, uu in due])], dim=1)
        keys = [(t, "lagged", step - t, ref.name, None) for t, _, _ in due]
        self._blocks.append(_Block(rows, keys, lr, None))
        self._last[("lagged", ref.name)] = (step, rows)
