"""Measuring the geometry along a training run (the paper's two-run protocol).

Run 1 trains and keeps its final point x* (a :class:`Reference`). Run 2 retraces the same
path and, at every step, calls a :class:`PathTracker` between ``backward()`` and
``optimizer.step()``::

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
  u = lr (g + wd x_t) = lr / (1 - lr wd) (g + wd x_{t+1}) is evaluated after the step, from the
  gradient the optimizer used (clipped, if it was clipped inside the measured step), nothing
  extra; for SGD with (non-Nesterov) momentum u = lr * momentum_buffer is read after the step,
  nothing extra either; in both, a parameter whose ``.grad`` is None at the step is one the
  optimizer skipped (u = 0 there). For every other optimizer (Adam, Nesterov, maximize, ...)
  one copy of the parameters is kept (same dtypes), and
  <u, x_t - x*> = <u, x_{t+1} - x*> + ||u||^2 is computed in one fused pass.
  Every identity-derived row is checked when rows are read: ||x_{t+1} - x*||^2 (measured after
  the step in the same pass) must equal c - 2a + b to rounding. A mismatch (the gradient or the
  learning rate changed between :meth:`measure` and the step, parameters changed inside the
  measured step, an optimizer the identities do not describe) warns once, leaves the a, b and
  ratios of the mismatched rows undefined (NaN), and from the next measured step on the
  update is the exact difference of the parameters (one copy, as for Adam).
* ``lagged`` (with ``lags=``): the paper's lagged orthogonal cosine. For the training gradient
  g_t, its component orthogonal to its own x_t - x* (primary reference) is
  g_t⊥ = g_t - (a_t / c_t)(x_t - x*), with ||g_t⊥||^2 = b_t - a_t^2 / c_t. The row of anchor
  step t and lag k (``step`` = t, ``sample`` = k) has a = <g_t⊥, g_{t+k}⊥>,
  b = ||g_{t+k}⊥||^2, c = ||g_t⊥||^2, so ``cos`` = a / sqrt(bc) is the cosine between the two
  orthogonal components (its rsi, eb and eta_star are left empty). Anchors are the steps
  divisible by ``lag_every``; at an anchor one copy u = g_t⊥ is kept on the device until its
  largest lag has passed (memory: about max(lags) / lag_every copies of the parameters), and at
  step s = t + k the cross terms <g_s, u> and <x_s - x*, u> of all anchors due come from one
  fused :func:`pathgeom_fast.secant_gram` pass: <g_s⊥, u> = <g_s, u> - (a_s / c_s) <x_s - x*, u>.
* ``probe``: every ``probe_every`` steps, the gradients of K fixed minibatches at x_t
  (``secant_stats_multi``: params and x* read once for all K), and ``full`` the full-batch
  gradient when ``full_batch=`` is given; with ``weight_decay=`` also ``probe_wd`` and
  ``full_wd`` (g + wd * x). Probes use ``torch.autograd.grad`` (the training ``.grad`` is
  untouched; for sharded FSDP2 models, whose gradients only reach the sharded parameters
  through backward hooks, ``backward()`` with the training ``.grad`` set aside and restored),
  a forked RNG and restored buffers (BatchNorm statistics), so they do not change the
  replayed path. Memory: the K probe gradients (one gradient for the full batch).

Several references. ``reference`` may be one :class:`Reference` or several (a mapping
name -> Reference, or a list of References with distinct ``name``): for example x* of run 1,
x* of a run with another seed, and x_0 (``Reference.from_model(model, name="x0")`` before
training). Every row carries the ``reference`` it was measured against; the first reference
is the primary one (the one :meth:`finish` checks the replay against).

No host synchronisation. Statistics stay on the device where they were computed; rows become
Python numbers only when they are read (:attr:`records`, :meth:`flush`, :meth:`finish`), all
pending steps in one device-to-host transfer. A measured step performs no device-to-host
conversion (the loss given to :meth:`step` is kept as a tensor too), so measuring does not
stall a GPU's queue. :meth:`last_stats` gives the last measured step's statistics as device
tensors, for loggers that accept tensors (Lightning).

Sharded models (FSDP2 ``fully_shard``, DTensor parameters) work as they are: statistics are
computed on local shards with one all-reduce per call, and ``Reference.from_file`` reads only
each rank's slice of x*.

Deterministic replay. Two runs retrace the same path when they start from the same
initialisation (same seed), see the same batches in the same order (seeded shuffling), and
run deterministic kernels (``torch.use_deterministic_algorithms(True)``; on GPU also
``CUBLAS_WORKSPACE_CONFIG=:4096:8``) on the same device type and dtypes. Give the tracker the
losses recorded in run 1 (``expected_losses=``) to be warned, when the rows are read, of the
first step that drifted; :meth:`finish` also warns if x_T is not x* at the end.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from .batches import check_not_empty, default_loss, full_batch_list
from ..checkpoints.keys import trainable
from ..checkpoints.reference import Reference
from ..ops.wrappers import secant_stats
from .geometry import metrics
from .gradient_rows import GradientRows
from .lagged_rows import LaggedRows
from .probes import Probes
from .rows import _Block, _is_dtensor, _to_host
from .update_rows import UpdateRows

Tensor = torch.Tensor

__all__ = ["PathTracker", "Reference", "trainable", "metrics"]

# This module is the state machine: the set-up, when rows are measured (measure / after_step
# through step()), the rows pending on the device, flush / records, the replay checks and
# finish. What is measured are mixins, which never import this module: gradient_rows
# (minibatch), update_rows (update), lagged_rows (lagged), probes (probe, full); rows (the
# pending blocks) and geometry (metrics) beside them.


def _as_references(reference) -> dict[str, Reference]:
    if isinstance(reference, Reference):
        return {reference.name: reference}
    if isinstance(reference, Mapping):
        items = list(reference.items())
    elif isinstance(reference, Sequence) and not isinstance(reference, (str, bytes)):
        items = [(r.name if isinstance(r, Reference) else None, r) for r in reference]
    else:
        raise TypeError(
            f"reference must be a Reference, a mapping name -> Reference or a list of References, "
            f"got {type(reference).__name__}"
        )
    out: dict[str, Reference] = {}
    for name, r in items:
        if not isinstance(r, Reference):
            raise TypeError(f"reference {name!r} is a {type(r).__name__}, not a pathgeom_fast Reference")
        if name in out:
            raise ValueError(f"two references are named {name!r}; give each a distinct name")
        out[name] = r
    if not out:
        raise ValueError("PathTracker needs at least one reference")
    return out


class PathTracker(GradientRows, UpdateRows, LaggedRows, Probes):
    """Records secant statistics of gradients and updates along a (replayed) path.

    Args:
        model: the model being trained.
        reference: x* (:class:`Reference`), or several (mapping name -> Reference, or a list of
            References with distinct names); the first is the primary reference.
        optimizer: the optimizer whose steps are measured (needed for ``update`` rows and lr).
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` for probe and full-batch gradients;
            default :func:`pathgeom_fast.batches.default_loss` (dict batches: the model's own
            ``.loss``; ``(inputs, targets)``: cross-entropy).
        probe_batches: K fixed batches whose gradients are measured every ``probe_every`` steps.
        probe_every: measure probes (and the full batch) at steps divisible by this; 0 = never.
        full_batch: batches covering the whole training set (their mean gradient, weighted by
            batch size, is the full-batch gradient), measured with the probes.
        weight_decay: also record ``minibatch_wd`` (and ``probe_wd``, ``full_wd``) rows for
            g + weight_decay * x.
        per_tensor: also keep per-tensor rows of the minibatch gradient in ``per_tensor_records``.
        update: "auto" (identities where they hold, else one parameter copy), "copy", or "off".
        expected_losses: {step: loss} recorded in run 1, to warn when the replay drifts.
        backend, group: passed to :func:`pathgeom_fast.secant_stats`.
        writer: optional object with ``add_scalar(tag, value, step)`` (TensorBoard), written to
            when rows are read.
        lags: record ``lagged`` rows for these lags k (the paper's: 1, 2, 5, 10, 20, 50);
            None = off.
        lag_every: anchor steps of the lagged cosine (steps divisible by it).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        reference: Reference | Mapping[str, Reference] | Sequence[Reference],
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
        lags: Sequence[int] | None = None,
        lag_every: int = 10,
    ):
        self.refs = _as_references(reference)
        for r in self.refs.values():
            r.check_matches(model)
        if update not in ("auto", "copy", "off"):
            raise ValueError(f"update must be 'auto', 'copy' or 'off', got {update!r}")
        if probe_every < 0:
            raise ValueError(f"probe_every must be >= 0, got {probe_every}")
        self.model = model
        self.ref = next(iter(self.refs.values()))  # the primary reference
        self.optimizer = optimizer
        self.loss_fn = loss_fn or default_loss
        self.probe_batches = list(probe_batches or [])
        check_not_empty(self.probe_batches, "probe batch")
        self.probe_every = probe_every
        self.full_batch = full_batch_list(full_batch)
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
        self.update_mode = self._update_mode(update)
        self.lags = tuple(sorted({int(k) for k in lags})) if lags else ()
        if any(k < 1 for k in self.lags):
            raise ValueError(f"lags must be positive integers, got {list(lags)}")
        if lag_every < 1:
            raise ValueError(f"lag_every must be >= 1, got {lag_every}")
        self.lag_every = int(lag_every)
        self._anchors: list[tuple[int, list[Tensor], Tensor]] = []
        self._records: list[dict[str, Any]] = []
        self._per_tensor_records: list[dict[str, Any]] = []
        self._blocks: list[_Block] = []
        self._last: dict[tuple[str, str], tuple[int, Tensor]] = {}
        self._last_per_tensor: dict[tuple[str, str], tuple[int, Tensor]] = {}
        self._copy: list[Tensor] | None = None
        self._pending: dict[str, Any] | None = None
        self._drift_warned = False
        self._zero_warned = False
        self._first_c: dict[str, Tensor] = {}
        self._ref_norms: dict[str, Tensor] = {}
        self._update_warned = False
        dtypes = {p.dtype for p in self.params} | {t.dtype for r in self.refs.values() for t in r.tensors}
        # rounding of x_{t+1} in the parameters' dtype, and the ops' error target (DESIGN.md 2)
        self._param_eps = max((torch.finfo(p.dtype).eps for p in self.params), default=0.0)
        self._kernel_eps = 1e-6 if dtypes - {torch.float64} else 1e-13
        self.last_step: int | None = None
        self.final_distance_ratios: dict[str, float] = {}

    # -- set-up -------------------------------------------------------------------------

    def _lr(self):
        """The first param group's learning rate: a float, or a tensor kept as it is (no sync)."""
        if self.optimizer is None:
            return None
        lr = self.optimizer.param_groups[0]["lr"]
        return lr.detach().clone() if isinstance(lr, Tensor) else float(lr)

    # -- pending rows -------------------------------------------------------------------

    def _add(self, step: int, kind: str, ref: str, stats: Tensor, lr, loss, samples: int = 0, check=None, hint: str = "") -> None:
        """Queue rows (stats [3] or [K, 3], still on the device)."""
        stats = stats.reshape(-1, 3)
        keys = [(step, kind, k if samples else 0, ref, None) for k in range(stats.shape[0])]
        self._blocks.append(_Block(stats, keys, lr, loss, check=(check, hint) if check is not None else None))
        self._last[(kind, ref)] = (step, stats)

    def _add_per_tensor(self, step: int, kind: str, ref: str, stats: Tensor, lr, loss) -> None:
        keys = [(step, kind, 0, ref, name) for name in self.names]
        self._blocks.append(_Block(stats.reshape(-1, 3), keys, lr, loss, per_tensor=True))
        self._last_per_tensor[(kind, ref)] = (step, stats.reshape(-1, 3))

    def flush(self) -> list[dict[str, Any]]:
        """Turn the pending rows into Python numbers (one transfer per device) and return the new
        (whole-model) rows. Runs the replay-drift and zero-gradient checks and writes to ``writer``."""
        blocks, self._blocks = self._blocks, []
        if not blocks:
            return []
        checks = [b.check[0] if b.check is not None else None for b in blocks]
        values = _to_host([b.stats for b in blocks] + [b.loss for b in blocks] + [b.lr for b in blocks] + checks)
        n = len(blocks)
        new: list[dict[str, Any]] = []
        for b, stats, loss, lr, check in zip(blocks, values[:n], values[n : 2 * n], values[2 * n : 3 * n], values[3 * n :]):
            loss = None if loss is None else float(loss)
            lr = None if lr is None else float(lr)
            rows3 = stats.tolist()
            if check is not None:
                rows3 = [self._checked_update(b.keys[0], rows3[0], check.tolist(), b.check[1])]
            for (step, kind, sample, ref, tensor), (a, bb, c) in zip(b.keys, rows3):
                row = {"step": step, "kind": kind, "sample": sample, "reference": ref, "lr": lr, "loss": loss}
                row.update(metrics(a, bb, c))
                if kind == "lagged":  # only the cosine means something for these rows
                    row.update(rsi=None, eb=None, eta_star=None)
                row.update(a=a, b=bb, c=c)
                if tensor is None:
                    new.append(row)
                else:
                    row["tensor"] = tensor
                    self._per_tensor_records.append(row)
        self._records.extend(new)
        self._check_rows(new)
        if self.writer is not None:
            for row in new:
                tag = row["kind"] if row["sample"] == 0 else f"{row['kind']}_{row['sample']}"
                if row["reference"] != self.ref.name:
                    tag = f"{tag}@{row['reference']}"
                for key in ("rsi", "eb", "cos", "eta_star"):
                    if row[key] is not None:
                        self.writer.add_scalar(f"pathgeom/{tag}/{key}", row[key], row["step"])
        return new

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every whole-model row so far (reading them converts the pending ones)."""
        self.flush()
        return self._records

    @property
    def per_tensor_records(self) -> list[dict[str, Any]]:
        """Per-tensor rows (with ``per_tensor=True``), each with a ``tensor`` name."""
        self.flush()
        return self._per_tensor_records

    def last_stats(self, per_tensor: bool = False) -> dict[tuple[str, str], tuple[int, Tensor]]:
        """{(kind, reference): (step, stats [n, 3] on the device)} of the latest rows of each kind,
        without any transfer (for loggers that take tensors). ``per_tensor=True``: the latest
        per-tensor stats instead ([T, 3], rows in the order of :attr:`names`; with ``per_tensor=True``
        at construction)."""
        return dict(self._last_per_tensor if per_tensor else self._last)

    # -- the measurement ----------------------------------------------------------------

    @torch.no_grad()
    def _stats(self, grads, ref: Reference, *, weight_decay: float = 0.0, per_tensor: bool = False, idx=None) -> Tensor:
        p, r = self.params, ref.tensors
        if idx is not None:
            grads, p, r = [grads[i] for i in idx], [p[i] for i in idx], [r[i] for i in idx]
        return secant_stats(grads, p, r, weight_decay=weight_decay, per_tensor=per_tensor, **self.kw)

    @contextlib.contextmanager
    def step(self, step: int | None = None, loss=None):
        """``with tracker.step(t, loss): optimizer.step()`` = measure(), the step, after_step()."""
        self.measure(step, loss)
        yield self
        self.after_step()

    # -- replay checks ------------------------------------------------------------------

    def _check_rows(self, rows: list[dict[str, Any]]) -> None:
        primary = self.ref.name
        for row in rows:
            if row["kind"] != "minibatch" or row["reference"] != primary:
                continue
            step, loss = row["step"], row["loss"]
            if not self._zero_warned and row["b"] == 0.0:
                self._zero_warned = True
                warnings.warn(
                    f"PathTracker: the gradient measured at step {row['step']} is exactly zero (||g||^2 = 0): "
                    "was it measured after optimizer.zero_grad(set_to_none=False)? Its rsi/eb/cos rows are 0 or nan.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            if self._drift_warned or loss is None or step not in self.expected_losses:
                continue
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
        """||x_T - x*|| / ||x_0 - x*|| for the primary reference (all of them in
        ``final_distance_ratios``); converts every pending row and warns if the replay did not
        end at the primary reference."""
        if self._pending is not None:
            raise RuntimeError("finish() called between measure() and after_step()")
        self._anchors = []  # the lagged cosine's copies are no longer needed
        ends = {name: secant_stats(self.params, self.params, ref.tensors, **self.kw)[2] for name, ref in self.refs.items()}
        names = list(ends)
        vals = _to_host([ends[n] for n in names] + [self._first_c.get(n) for n in names])
        for i, n in enumerate(names):
            c_end, c0 = float(vals[i]), vals[len(names) + i]
            if c0 is None:  # nothing was measured
                self.final_distance_ratios[n] = math.nan
            else:
                c0 = float(c0)
                self.final_distance_ratios[n] = math.sqrt(c_end / c0) if c0 else (0.0 if c_end == 0 else math.inf)
        self.flush()
        ratio = self.final_distance_ratios[self.ref.name]
        if ratio > rtol:
            warnings.warn(
                f"the replayed run ended at distance {math.sqrt(float(vals[0])):.3e} from the reference "
                f"{self.ref.name!r} ({ratio:.2e} of the starting distance): it did not retrace the recorded path",
                RuntimeWarning,
                stacklevel=2,
            )
        return ratio
