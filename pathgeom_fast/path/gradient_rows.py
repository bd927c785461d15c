"""The gradient rows of a :class:`~pathgeom_fast.path.tracker.PathTracker`: ``minibatch``
(and ``minibatch_wd``, per-tensor rows), the training gradient g at x_t, measured by
:meth:`GradientRows.measure` between ``backward()`` and ``optimizer.step()``. ``measure`` also
starts the step's lagged and probe rows and keeps what the step's update row needs.

A mixin of ``PathTracker`` (never imported from here): it reads the tracker's state and calls
its hooks ``_lr``, ``_stats``, ``_add``, ``_add_per_tensor``, ``_lagged``, ``_probes``,
``_groups``. Subclasses override ``_grads`` (DeepSpeed's and torchtitan's local pieces).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


class GradientRows:
    """``minibatch`` rows: the gradient ``_grads`` returns (``.grad``) against every reference."""

    def _grads(self, step: int) -> list[Tensor]:
        grads = [p.grad for p in self.params]
        if all(g is None for g in grads):
            raise RuntimeError(
                f"PathTracker: step {step} has no gradient at all (every trainable parameter's .grad is None); "
                "measure after backward() and before optimizer.zero_grad()"
            )
        # a parameter unused in this step has no .grad: the optimizer leaves it, so does u
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]

    def measure(self, step: int | None = None, loss: float | Tensor | None = None) -> None:
        """Measure at x_t: call after ``backward()`` and before ``optimizer.step()``.

        Nothing is converted to Python numbers here (see :meth:`flush`)."""
        if self._pending is not None:
            raise RuntimeError("PathTracker.measure() called twice without after_step() in between")
        step = (self.last_step + 1 if self.last_step is not None else 0) if step is None else int(step)
        self.last_step = step
        loss_v = loss.detach() if isinstance(loss, Tensor) else (None if loss is None else float(loss))
        lr = self._lr()
        grads = self._grads(step)
        c_now: dict[str, Tensor] = {}
        primary_stats = None
        for name, ref in self.refs.items():
            if self.per_tensor:
                per = self._stats(grads, ref, per_tensor=True)
                self._add_per_tensor(step, "minibatch", name, per, lr, loss_v)
                s = per.sum(0)
            else:
                s = self._stats(grads, ref)
            self._add(step, "minibatch", name, s, lr, loss_v)
            c_now[name] = s[2]
            primary_stats = s if primary_stats is None else primary_stats
            self._first_c.setdefault(name, s[2])
            if self.weight_decay:
                self._add(step, "minibatch_wd", name, self._stats(grads, ref, weight_decay=self.weight_decay), lr, loss_v)
        if self.lags:
            self._lagged(step, grads, primary_stats, lr)
        if self.probe_every and step % self.probe_every == 0:
            self._probes(step, lr)
        self._pending = {"step": step, "c": c_now, "lr": lr, "loss": loss_v, "mode": self.update_mode}
        if self.update_mode in ("sgd", "momentum"):
            # the hyper-parameters of the step about to be taken (a scheduler may change them
            # right after it, inside the measured step)
            self._pending["groups"] = [
                (float(g["lr"]), float(g.get("weight_decay", 0.0) or 0.0), idx) for g, idx in self._groups()
            ]
            self._pending["had_grad"] = [p.grad is not None for p in self.params]
        elif self.update_mode == "copy":
            if self._copy is None:
                self._copy = [p.detach().clone() for p in self.params]
            elif self.sharded:
                for c, p in zip(self._copy, self.params):
                    c.copy_(p.detach())
            else:
                torch._foreach_copy_(self._copy, [p.detach() for p in self.params])
