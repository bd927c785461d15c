"""Measuring the geometry along a training run (the paper's two-run protocol).

Run 1 trains and keeps its final point x* (``Reference``). Run 2 retraces the same path and,
at every step, calls a :class:`PathTracker` between ``backward()`` and ``optimizer.step()``::

    tracker = PathTracker(model, Reference.from_file(model, "xstar.safetensors"), optimizer,
                          loss_fn=loss_fn, probe_batches=fixed_batches, probe_every=10)
    for step, batch in enumerate(loader):
        loss = loss_fn(model, batch)
        loss.backward()
        with tracker.step(step, loss=loss):   # measures g before, the update u after
            optimizer.step()
        optimizer.zero_grad()
    tracker.finish()                          # checks that the replay really reached x*

What is measured (each a row of ``tracker.records``; a, b, c as in DESIGN.md section 1):

* ``minibatch``: the training gradient g at x_t (what ``backward()`` left in ``.grad``).
* ``minibatch_wd`` (with ``weight_decay=``): g + wd * x, without a copy.
* ``update``: u = x_t - x_{t+1}, the step the optimizer really took: a = <u, x_t - x*>,
  b = ||u||^2, c = ||x_t - x*||^2. Memory: for SGD without momentum the identity
  u = lr (g + wd x) needs nothing extra; for SGD with (non-Nesterov) momentum
  u = lr * momentum_buffer is read after the step, nothing extra either; for every other
  optimizer (Adam, Nesterov, maximize, ...) one copy of the parameters is kept (same dtypes),
  and <u, x_t - x*> = <u, x_{t+1} - x*> + ||u||^2 is computed in one fused pass.
* ``probe``: every ``probe_every`` steps, the gradients of K fixed minibatches at x_t
  (``secant_stats_multi``: params and x* read once for all K), and ``full`` the full-batch
  gradient when ``full_batch=`` is given. Probes use ``torch.autograd.grad`` (the training
  ``.grad`` is untouched; for sharded FSDP2 models, whose gradients only reach the sharded
  parameters through backward hooks, ``backward()`` with the training ``.grad`` set aside and
  restored), a forked RNG and restored buffers (BatchNorm statistics), so they do not change
  the replayed path. Memory: the K probe gradients (one gradient for the full batch).

Sharded models (FSDP2 ``fully_shard``, DTensor parameters) work as they are: statistics are
computed on local shards with one all-reduce per call, and ``Reference.from_file`` reads only
each rank's slice of x*.

Deterministic replay. Two runs retrace the same path when they start from the same
initialisation (same seed), see the same batches in the same order (seeded shuffling), and
run deterministic kernels (``torch.use_deterministic_algorithms(True)``; on GPU also
``CUBLAS_WORKSPACE_CONFIG=:4096:8``) on the same device type and dtypes. Give the tracker the
losses recorded in run 1 (``expected_losses=``) to be warned at the first step that drifts;
``finish()`` also warns if x_T is not x* at the end.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from .ops import secant_stats, secant_stats_multi

Tensor = torch.Tensor


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The named parameters that train (requires_grad), in ``named_parameters()`` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class Reference:
    """The reference point x*, aligned parameter by parameter with a model."""

    def __init__(self, names: Sequence[str], tensors: Sequence[Tensor]):
        self.names = list(names)
        self.tensors = list(tensors)

    @classmethod
    def from_state_dict(cls, model: torch.nn.Module, state: Mapping[str, Tensor], *, source: str = "state dict") -> "Reference":
        """Match ``state`` to the model's trainable parameters by name; errors list what is off."""
        named = trainable(model)
        missing = [n for n, _ in named if n not in state]
        if missing:
            raise KeyError(
                f"reference {source} lacks {len(missing)} of the model's parameters: {missing[:5]}"
                + (" ..." if len(missing) > 5 else "")
                + f" (it has {len(state)} keys, e.g. {list(state)[:3]})"
            )
        tensors = []
        for n, p in named:
            t = state[n]
            if not isinstance(t, Tensor):
                raise TypeError(f"reference {source}: {n!r} is a {type(t).__name__}, not a tensor")
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(
                    f"reference {source}: {n!r} has shape {list(t.shape)} but the model's parameter has {list(p.shape)}"
                )
            if _is_dtensor(p) and not _is_dtensor(t):
                from .distributed_path import shard_like

                t = shard_like(t, p)
            else:
                t = t.detach().to(p.device)
            tensors.append(t)
        return cls([n for n, _ in named], tensors)

    @classmethod
    def from_file(cls, model: torch.nn.Module, path: str) -> "Reference":
        """x* from a safetensors snapshot (never unpickled).

        For a sharded model (DTensor parameters, e.g. FSDP2) each rank reads only its own
        slice of each tensor from the file.
        """
        from .snapshots import load_snapshot, snapshot_keys

        named = trainable(model)
        if named and _is_dtensor(named[0][1]):
            from .distributed_path import read_sharded

            keys = snapshot_keys(path)
            missing = [n for n, _ in named if n not in keys]
            if missing:
                raise KeyError(f"reference file {path} lacks {len(missing)} of the model's parameters: {missing[:5]}")
            return cls([n for n, _ in named], [read_sharded(path, n, p) for n, p in named])
        return cls.from_state_dict(model, load_snapshot(path)[0], source=f"file {path}")

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "Reference":
        """A copy of the model's current trainable parameters (e.g. the end of run 1)."""
        named = trainable(model)
        return cls([n for n, _ in named], [p.detach().clone() for _, p in named])

    def check_matches(self, model: torch.nn.Module) -> None:
        names = [n for n, _ in trainable(model)]
        if names != self.names:
            raise ValueError(
                f"reference parameters {self.names[:3]}... do not match the model's {names[:3]}... "
                f"({len(self.names)} vs {len(names)} tensors)"
            )


def _is_dtensor(t) -> bool:
    from .distributed import is_dtensor

    return is_dtensor(t)


def _div(x: float, y: float) -> float:
    """x / y with torch's semantics for zero denominators (inf or nan), without tensors."""
    if y != 0.0:
        return x / y
    return math.nan if x == 0.0 or math.isnan(x) else math.copysign(math.inf, x)


def _row(step, kind, sample, stats: Tensor, lr, loss) -> dict[str, Any]:
    """One record; the metrics are those of pathgeom_fast.geometry, in plain floats (this runs
    every step, where a handful of tensor ops would cost more than the fused pass)."""
    a, b, c = (float(v) for v in stats.tolist())
    return {
        "step": step,
        "kind": kind,
        "sample": sample,
        "lr": lr,
        "loss": loss,
        "rsi": _div(a, c),
        "eb": math.sqrt(_div(b, c)),
        "cos": _div(a, math.sqrt(b * c)),
        "eta_star": _div(a, b),
        "a": a,
        "b": b,
        "c": c,
    }


def _batch_len(batch) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return len(first)


class PathTracker:
    """Records secant statistics of gradients and updates along a (replayed) path.

    Args:
        model: the model being trained.
        reference: x* (:class:`Reference`).
        optimizer: the optimizer whose steps are measured (needed for ``update`` rows and lr).
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` for probe and full-batch gradients.
        probe_batches: K fixed batches whose gradients are measured every ``probe_every`` steps.
        probe_every: measure probes (and the full batch) at steps divisible by this; 0 = never.
        full_batch: batches covering the whole training set (their mean gradient, weighted by
            batch length, is the full-batch gradient), measured with the probes.
        weight_decay: also record the ``minibatch_wd`` row for g + weight_decay * x.
        per_tensor: also keep per-tensor rows of the minibatch gradient in ``per_tensor_records``.
        update: "auto" (identities where they hold, else one parameter copy), "copy", or "off".
        expected_losses: {step: loss} recorded in run 1, to warn when the replay drifts.
        backend, group: passed to :func:`pathgeom_fast.secant_stats`.
        writer: optional object with ``add_scalar(tag, value, step)`` (TensorBoard).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        reference: Reference,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        loss_fn: Callable[[torch.nn.Module, Any], Tensor] | None = None,
        probe_batches: Sequence[Any] | None = None,
        probe_every: int = 0,
        full_batch: Iterable[Any] | None = None,
        weight_decay: float | None = None,
        per_tensor: bool = False,
        update: str = "auto",
        expected_losses: Mapping[int, float] | None = None,
        drift_rtol: float = 1e-5,
        backend: str = "auto",
        group=None,
        writer=None,
    ):
        reference.check_matches(model)
        if update not in ("auto", "copy", "off"):
            raise ValueError(f"update must be 'auto', 'copy' or 'off', got {update!r}")
        if (probe_batches or full_batch is not None) and loss_fn is None:
            raise ValueError("probe_batches / full_batch need loss_fn(model, batch) -> loss")
        if probe_every < 0:
            raise ValueError(f"probe_every must be >= 0, got {probe_every}")
        self.model = model
        self.ref = reference
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.probe_batches = list(probe_batches or [])
        self.probe_every = probe_every
        self.full_batch = list(full_batch) if full_batch is not None else None
        self.weight_decay = weight_decay
        self.per_tensor = per_tensor
        self.expected_losses = dict(expected_losses or {})
        self.drift_rtol = drift_rtol
        self.kw = dict(backend=backend, group=group)
        self.writer = writer
        named = trainable(model)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.sharded = bool(self.params) and _is_dtensor(self.params[0])
        self.records: list[dict[str, Any]] = []
        self.per_tensor_records: list[dict[str, Any]] = []
        self.update_mode = self._update_mode(update)
        self._copy: list[Tensor] | None = None
        self._pending: dict[str, Any] | None = None
        self._drift_warned = False
        self.first_c: float | None = None
        self.last_step: int | None = None

    # -- set-up -------------------------------------------------------------------------

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

    def _lr(self) -> float | None:
        if self.optimizer is None:
            return None
        lr = self.optimizer.param_groups[0]["lr"]
        return float(lr.item() if isinstance(lr, Tensor) else lr)

    def _grads(self) -> list[Tensor]:
        # a parameter unused in this step has no .grad: the optimizer leaves it, so does u
        return [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]

    # -- the measurement ----------------------------------------------------------------

    def _add(self, row: dict[str, Any]) -> None:
        self.records.append(row)
        if self.writer is not None:
            tag = row["kind"] if row["sample"] in (None, 0) else f"{row['kind']}_{row['sample']}"
            for key in ("rsi", "eb", "cos", "eta_star"):
                self.writer.add_scalar(f"pathgeom/{tag}/{key}", row[key], row["step"])

    @torch.no_grad()
    def _stats(self, grads, *, weight_decay: float = 0.0, per_tensor: bool = False, idx=None) -> Tensor:
        p, r = self.params, self.ref.tensors
        if idx is not None:
            grads, p, r = [grads[i] for i in idx], [p[i] for i in idx], [r[i] for i in idx]
        return secant_stats(grads, p, r, weight_decay=weight_decay, per_tensor=per_tensor, **self.kw).cpu()

    def measure(self, step: int | None = None, loss: float | Tensor | None = None) -> dict[str, Any]:
        """Measure at x_t: call after ``backward()`` and before ``optimizer.step()``."""
        if self._pending is not None:
            raise RuntimeError("PathTracker.measure() called twice without after_step() in between")
        step = (self.last_step + 1 if self.last_step is not None else 0) if step is None else int(step)
        self.last_step = step
        loss_v = float(loss.detach()) if isinstance(loss, Tensor) else (None if loss is None else float(loss))
        self._check_drift(step, loss_v)
        lr = self._lr()
        grads = self._grads()
        s = self._stats(grads)
        row = _row(step, "minibatch", 0, s, lr, loss_v)
        self._add(row)
        if self.first_c is None:
            self.first_c = row["c"]
        if self.weight_decay:
            self._add(_row(step, "minibatch_wd", 0, self._stats(grads, weight_decay=self.weight_decay), lr, loss_v))
        if self.per_tensor:
            per = self._stats(grads, per_tensor=True)
            for name, st in zip(self.names, per):
                pr = _row(step, "minibatch", 0, st, lr, loss_v)
                pr["tensor"] = name
                self.per_tensor_records.append(pr)
        if self.probe_every and step % self.probe_every == 0:
            self._probes(step, lr)
        self._pending = {"step": step, "c": row["c"], "lr": lr, "loss": loss_v}
        if self.update_mode == "sgd":
            a = b = 0.0
            for g, idx in self._groups():
                sg = self._stats(grads, weight_decay=float(g.get("weight_decay", 0.0)), idx=idx)
                lr_g = float(g["lr"])
                a += lr_g * float(sg[0])
                b += lr_g * lr_g * float(sg[1])
            self._pending["ab"] = (a, b)
        elif self.update_mode == "copy":
            if self._copy is None:
                self._copy = [p.detach().clone() for p in self.params]
            elif self.sharded:
                for c, p in zip(self._copy, self.params):
                    c.copy_(p.detach())
            else:
                torch._foreach_copy_(self._copy, [p.detach() for p in self.params])
        return row

    @torch.no_grad()
    def after_step(self) -> dict[str, Any] | None:
        """Record the update u = x_t - x_{t+1}: call right after ``optimizer.step()``."""
        pend, self._pending = self._pending, None
        if pend is None:
            raise RuntimeError("PathTracker.after_step() called without measure() before the step")
        if self.update_mode == "off":
            return None
        if self.update_mode == "sgd":
            a, b = pend["ab"]
        elif self.update_mode == "momentum":
            a = b = 0.0
            for g, idx in self._groups():
                lr_g = float(g["lr"])
                bufs = []
                for i in idx:
                    st = self.optimizer.state.get(self.params[i], {})
                    buf = st.get("momentum_buffer")
                    bufs.append(buf if buf is not None else torch.zeros_like(self.params[i]))
                p = [self.params[i] for i in idx]
                r = [self.ref.tensors[i] for i in idx]
                s = secant_stats(bufs, p, r, **self.kw).cpu()
                # x_t = x_{t+1} + lr buf:  <u, x_t - x*> = lr <buf, x_{t+1} - x*> + lr^2 ||buf||^2
                a += lr_g * float(s[0]) + lr_g * lr_g * float(s[1])
                b += lr_g * lr_g * float(s[1])
        else:  # copy: h = x_t - x_{t+1} = u via weight_decay = -1 on params = x_{t+1}
            s = secant_stats(self._copy, self.params, self.ref.tensors, weight_decay=-1.0, **self.kw).cpu()
            a, b = float(s[0]) + float(s[1]), float(s[1])
        stats = torch.tensor([a, b, pend["c"]], dtype=torch.float64)
        row = _row(pend["step"], "update", 0, stats, pend["lr"], pend["loss"])
        self._add(row)
        return row

    @contextlib.contextmanager
    def step(self, step: int | None = None, loss=None):
        """``with tracker.step(t, loss): optimizer.step()`` = measure(), the step, after_step()."""
        self.measure(step, loss)
        yield self
        self.after_step()

    # -- probes -------------------------------------------------------------------------

    def _one_grad(self, batch) -> list[Tensor]:
        with torch.enable_grad():
            loss = self.loss_fn(self.model, batch)
            if not self.sharded:
                return list(torch.autograd.grad(loss, self.params, allow_unused=True, materialize_grads=True))
            # FSDP2 moves gradients to the sharded parameters in its own backward hooks, which
            # autograd.grad bypasses: run backward() with the training .grad set aside.
            saved = [p.grad for p in self.params]
            for p in self.params:
                p.grad = None
            try:
                loss.backward()
                return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            finally:
                for p, g in zip(self.params, saved):
                    p.grad = g

    def _grad_of(self, batches: Sequence[Any]) -> list[Tensor]:
        """Mean gradient over batches (weighted by batch length), leaving ``.grad`` as it was."""
        total = sum(_batch_len(b) for b in batches)
        acc = None
        for b in batches:
            gs = self._one_grad(b)
            w = _batch_len(b) / total
            if acc is None:
                acc = [g * w for g in gs] if len(batches) > 1 else gs
            else:
                for a, g in zip(acc, gs):
                    a.add_(g, alpha=w)
        return acc

    def _probes(self, step: int, lr) -> None:
        devices = sorted({p.device.index or 0 for p in self.params if p.device.type == "cuda"})
        buffers = [b for b in self.model.buffers()]
        saved = [b.detach().clone() for b in buffers]
        with torch.random.fork_rng(devices=devices):
            if self.probe_batches:
                grads = [self._grad_of([b]) for b in self.probe_batches]
                s = secant_stats_multi(grads, self.params, self.ref.tensors, **self.kw).cpu()
                for k, sk in enumerate(s):
                    self._add(_row(step, "probe", k, sk, lr, None))
                del grads
            if self.full_batch is not None:
                g = self._grad_of(self.full_batch)
                self._add(_row(step, "full", 0, self._stats(g), lr, None))
        with torch.no_grad():
            for b, v in zip(buffers, saved):
                b.copy_(v)

    # -- replay checks ------------------------------------------------------------------

    def _check_drift(self, step: int, loss: float | None) -> None:
        if loss is None or step not in self.expected_losses or self._drift_warned:
            return
        want = self.expected_losses[step]
        if not math.isclose(loss, want, rel_tol=self.drift_rtol, abs_tol=self.drift_rtol):
            self._drift_warned = True
            warnings.warn(
                f"replay drifts from the recorded path at step {step}: loss {loss!r}, recorded {want!r}. "
                "Same seed, data order and deterministic algorithms are needed (see PathTracker docs); "
                "the measurements past this step are against a different path.",
                RuntimeWarning,
                stacklevel=3,
            )

    @torch.no_grad()
    def finish(self, rtol: float = 1e-4) -> float:
        """||x_T - x*|| / ||x_0 - x*||; warns if the replay did not end at x*."""
        if self._pending is not None:
            raise RuntimeError("finish() called between measure() and after_step()")
        s = secant_stats(self.params, self.params, self.ref.tensors, **self.kw).cpu()
        c_end = float(s[2])
        ratio = math.sqrt(c_end / self.first_c) if self.first_c else 0.0
        if ratio > rtol:
            warnings.warn(
                f"the replayed run ended at distance {math.sqrt(c_end):.3e} from the reference "
                f"({ratio:.2e} of the starting distance): it did not retrace the recorded path",
                RuntimeWarning,
                stacklevel=2,
            )
        return ratio
