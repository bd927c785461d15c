"""torchtitan: measure the steps torchtitan logs, before clipping, through its MetricsProcessor.

torchtitan has no callbacks. Its ``Trainer.train_step`` calls
``torchtitan.distributed.utils.clip_grad_norm_`` (through the module, at every step) between the
backward passes and ``optimizers.step()``, and logs through the ``MetricsProcessor`` that
``config.metrics.build(...)`` returns, on the steps where ``should_log(step)`` is true (step 1
and every ``log_freq`` steps). :class:`PathGeometryMetricsProcessor` is that processor with x*
added; set it as the trainer's metrics config and nothing else changes::

    from pathgeom_fast.integrations.torchtitan import PathGeometryMetricsProcessor

    config.metrics = PathGeometryMetricsProcessor.Config(log_freq=10, pathgeom_record_to="run1/xstar.safetensors")  # run 1
    config.metrics = PathGeometryMetricsProcessor.Config(log_freq=10, pathgeom_reference="run1/xstar.safetensors")  # run 2

**What is measured, and when.** Exactly the steps torchtitan logs (``should_log(step)``: step 1
and the multiples of ``log_freq``): while it is built, the processor replaces
``torchtitan.distributed.utils.clip_grad_norm_`` with a wrapper that, on those steps, measures
a = <g, x_t - x*>, b = ||g||^2, c = ||x_t - x*||^2 from the gradients **before** torchtitan's
clipping touches them, then calls torchtitan's own function with the same arguments and
returns its result unchanged (the clipping and the logged ``grad_norm`` are torchtitan's). The
update rows (``pathgeom/update_*``: u = x_t - x_{t+1}, the step the optimizer took with the
clipped gradient) come from a copy of the local shards taken before the step, read at
``log()``, after ``optimizers.step()``. ``log()`` adds ``pathgeom/rsi``, ``pathgeom/eb``,
``pathgeom/cos``, ``pathgeom/eta_star`` and ``pathgeom/update_*`` to ``extra_metrics`` (so to
TensorBoard / W&B, under torchtitan's own step) and prints one more console line; everything
torchtitan logs is passed on unchanged. Steps are torchtitan's (1-based) step numbers.

**Meshes.** Each rank measures its own local shards (``DTensor.to_local()``; plain tensors as
they are) and **one** all-reduce (SUM) of the small result over all ranks gives every rank the
sums over the whole model: a tensor's shard counts only on the ranks at coordinate 0 of every
mesh dimension on which it is replicated (HSDP's replicate dimension, TP-replicated norms), and,
for a tensor whose mesh does not span its whole pipeline stage (or a plain tensor), only on the
copy that holds the stage's first rank; pipeline stages hold different parameters and are all
summed. torchtitan's world layout is assumed (``pp`` outermost: the stage of rank r is
``r // (world // pp)``) and checked against the ``pp_mesh`` the trainer passes to the clip.
Every pipeline stage reads its own parameters' slices of x*; the other stages' keys in the
file are allowed.

**Refused** with a ``ValueError``: expert parallelism (``ep > 1``: torchtitan reduces the expert
and the dense norms over different meshes; when the processor is built, before any step);
``pathgeom_record_to`` with pipeline parallelism (each stage holds other parameters; record x*
with ``pp = 1``); meshes that cross pipeline stages, ``Partial`` parameters (at the first clip).
The reference file is checked key by key against the model when the trainer hands the
processor its ``model_parts`` (in ``Trainer.__init__``, before any step).

**The loss of a step** (recorded by run 1, compared by run 2): torchtitan's
``global_avg_loss`` of the steps it logs; the other steps have none.

At the end, ``Trainer.close()`` calls :meth:`close` (every rank): run 2 computes
``final_distance_ratio`` = ||x_T - x*|| / ||x_0 - x*|| (logged as
``pathgeom/final_distance_ratio``), run 1 writes x_T and the loss trajectory. All rows are in
``processor.measurer.records``.

torchtitan's ``Trainer`` does not start on a machine without an accelerator (see
docs/torchtitan.md); the pieces it calls (its ``clip_grad_norm_``, ``MetricsProcessor``,
``ParallelDims`` meshes, its llama3 model and ``parallelize_llama``, ``Trainer.train_step``) run
on CPU with gloo, and that is how this module is tested.
"""

from __future__ import annotations

try:
    import torchtitan.distributed.utils as _tt_dist_utils
    from torchtitan.components.metrics import MetricsProcessor
    from torchtitan.tools.logging import logger as _tt_logger
except ImportError as exc:  # pragma: no cover - exercised only without torchtitan
    raise ImportError(
        "pathgeom_fast.integrations.torchtitan needs torchtitan: pip install 'torchtitan>=0.3' "
        "(it needs a torch as recent as the one it was released with)"
    ) from exc

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..checkpoints.keys import trainable
from ..checkpoints.reference import Reference
from ..ops.distributed import is_dtensor
from ..path.tracker import PathTracker
from .helpers import unwrap_model
from .step_measurer import StepMeasurer

Tensor = torch.Tensor

__all__ = ["PathGeometryMetricsProcessor", "local_pieces"]


# ------------------------------------------------------------------------------------------
# The model parts of this rank and their local pieces
# ------------------------------------------------------------------------------------------


class _Parts(torch.nn.Module):
    """This rank's model parts (pipeline stages) as one module: their parameters under their
    own names (aliases, no copy). x* files hold the other stages' keys too."""

    _keys_to_ignore_on_load_unexpected = [r".*"]

    def __init__(self, parts):
        super().__init__()
        seen: dict[str, int] = {}
        for part in parts:
            for name, p in unwrap_model(part).named_parameters():
                if name in seen:
                    if seen[name] != id(p):
                        raise ValueError(f"PathGeometryMetricsProcessor: two model parts hold a parameter {name!r}")
                    continue
                seen[name] = id(p)
                owner = self
                for piece in name.split(".")[:-1]:
                    if piece not in owner._modules:
                        owner._modules[piece] = torch.nn.Module()
                    owner = owner._modules[piece]
                owner._parameters[name.rsplit(".", 1)[-1]] = p


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _stage(pp_mesh) -> tuple[int, int]:
    """(first rank, number of ranks) of this rank's pipeline stage, checked against ``pp_mesh``."""
    rank, world = _world()
    pp = pp_mesh.size() if pp_mesh is not None else 1
    if world % pp:
        raise ValueError(f"PathGeometryMetricsProcessor: the pp mesh has {pp} ranks, the world {world}")
    per = world // pp
    if pp_mesh is not None:
        got = sorted(int(r) for r in pp_mesh.mesh.flatten().tolist())
        want = [rank % per + k * per for k in range(pp)]
        if got != want:
            raise ValueError(
                f"PathGeometryMetricsProcessor: the pp mesh holds ranks {got}, not {want}: pipeline stages are "
                "expected outermost in the world mesh (torchtitan's ParallelDims layout)"
            )
    return rank - rank % per, per


def _keeps(name: str, p, first: int, per: int) -> bool:
    """Whether this rank's piece of ``p`` counts in a SUM over all ranks (each element once)."""
    rank, _ = _world()
    if not is_dtensor(p):
        return rank == first  # a whole copy on every rank of the stage
    from torch.distributed.tensor import Partial, Replicate

    mesh = p.device_mesh
    ranks = [int(r) for r in mesh.mesh.flatten().tolist()]
    if any(r < first or r >= first + per for r in ranks):
        raise ValueError(
            f"PathGeometryMetricsProcessor: {name!r} lives on a mesh with ranks {ranks}, outside this rank's "
            f"pipeline stage (ranks {first}..{first + per - 1})"
        )
    if any(isinstance(pl, Partial) for pl in p.placements):
        raise ValueError(f"PathGeometryMetricsProcessor: {name!r} has a Partial placement {p.placements}")
    coord = mesh.get_coordinate()
    replicated_here = any(isinstance(pl, Replicate) and coord[d] != 0 for d, pl in enumerate(p.placements))
    # a mesh narrower than the stage: the copies on the other sub-meshes are the same tensor
    return not replicated_here and min(ranks) == first


def _local(t: Tensor) -> Tensor:
    return t.to_local() if is_dtensor(t) else t


def local_pieces(holder: torch.nn.Module, pp_mesh=None) -> list[tuple[str, Tensor, Tensor | None, bool]]:
    """(name, local piece, local gradient piece or None, counted here) of every trainable
    parameter of ``holder``: a piece that does not count is still returned (its sums are not
    added in)."""
    first, per = _stage(pp_mesh)
    out = []
    for name, p in trainable(holder):
        keep = _keeps(name, p, first, per)
        g = p.grad
        if g is not None and is_dtensor(g) and (g.device_mesh != p.device_mesh or g.placements != p.placements):
            g = g.redistribute(p.device_mesh, p.placements)
        out.append((name, _local(p.detach()), None if g is None else _local(g), keep))
    return out


class _Pieces(torch.nn.Module):
    """The counted local pieces as parameters p0, p1, ... (aliases; empty where not counted)."""

    def __init__(self, pieces):
        super().__init__()
        for i, (_, w, _, keep) in enumerate(pieces):
            t = w if keep else w.new_empty(0)
            self.register_parameter(f"p{i}", torch.nn.Parameter(t, requires_grad=True))

    def refresh(self, pieces) -> None:
        for p, (_, w, _, keep) in zip(self.parameters(), pieces):
            if keep and (w.data_ptr() != p.data_ptr() or w.shape != p.shape):
                p.data = w


class _TitanTracker(PathTracker):
    """A PathTracker over this rank's counted pieces, summed over all ranks (one all-reduce)."""

    def __init__(self, pieces, refs, names, **kwargs):
        self.pieces = _Pieces(pieces)
        super().__init__(self.pieces, refs, **kwargs)
        self.names = names  # per-tensor rows under the model's names
        self._local_grads: list[Tensor] | None = None

    def refresh(self, pieces, step: int) -> None:
        self.pieces.refresh(pieces)
        grads = []
        for p, (name, _, g, keep) in zip(self.params, pieces):
            if not keep:
                grads.append(p.detach())  # empty
            elif g is None:
                grads.append(torch.zeros_like(p))  # unused in this step: the optimizer leaves it
            else:
                grads.append(g)
        if all(g is None for _, _, g, _ in pieces):
            raise RuntimeError(
                f"PathGeometryMetricsProcessor: step {step} has no gradient at all when torchtitan clips "
                "(every trainable parameter's .grad is None)"
            )
        self._local_grads = grads

    def _grads(self, step: int) -> list[Tensor]:
        grads, self._local_grads = self._local_grads, None
        if grads is None:
            raise RuntimeError(f"PathGeometryMetricsProcessor: step {step} has no gradient pieces")
        return grads


class _TitanMeasurer(StepMeasurer):
    framework = "PathGeometryMetricsProcessor"
    loss_definition = "torchtitan: global_avg_loss of the steps it logs (the others have none)"

    def __init__(self, processor, reference, **kwargs):
        self.processor = processor
        super().__init__(reference, 1, expected_losses=kwargs.pop("expected_losses", "auto"), **kwargs)
        self._pp_mesh = None

    def wants(self, step: int) -> bool:
        return bool(self.refs) and MetricsProcessor.should_log(self.processor, step)

    def _setup(self, model, optimizer) -> PathTracker:
        pieces = local_pieces(model, self._pp_mesh)
        if self.tracker is not None:
            self.tracker.refresh(pieces, self._last_step)
            return self.tracker
        names = [n for n, *_ in pieces]
        refs = {}
        for rname, r in self.refs.items():
            full = r if isinstance(r, Reference) else Reference.from_file(model, r, name=rname)
            full.check_matches(model)
            tensors = [_local(t) if keep else w.new_empty(0) for t, (_, w, _, keep) in zip(full.tensors, pieces)]
            tensors = [t.to(w.device) for t, (_, w, _, _) in zip(tensors, pieces)]
            refs[rname] = Reference([f"p{i}" for i in range(len(pieces))], tensors, name=rname, source=full.source)
        _, world = _world()
        self.tracker = _TitanTracker(
            pieces,
            refs,
            names,
            optimizer=optimizer,
            per_tensor=self.per_tensor,
            update="off" if self.update == "off" else "copy",
            backend=self.backend,
            group=dist.group.WORLD if world > 1 else None,
        )
        self.tracker.refresh(pieces, self._last_step)
        return self.tracker

    def refresh_for_update(self) -> None:
        """Point the pieces at the parameters' storage again before the update rows are read."""
        if self.tracker is not None and self._model is not None:
            self.tracker.pieces.refresh(local_pieces(self._model, self._pp_mesh))

    def _write_reference(self, model, steps: int) -> None:
        # torchtitan's steps are 1-based: the last one is the number of optimizer steps
        super()._write_reference(model, steps - 1)

    def write_report(self, out_dir: str, title: str = "") -> dict:
        from ..report.summary import write_report

        if self.tracker is None:
            raise RuntimeError(f"{self.framework}: nothing measured yet (no reference, or no measured step)")
        numel = torch.tensor(
            [float(sum(w.numel() for w in self.tracker.params))], dtype=torch.float64, device=self.tracker.params[0].device
        )
        if _world()[1] > 1:
            dist.all_reduce(numel)  # a collective: call on every rank
        extra = {"replay_final_distance_ratio": self.final_distance_ratio} if self.final_distance_ratio is not None else None
        return write_report(out_dir, self.records, self.per_tensor_records, int(numel.item()), title, extra, findings=True)


# ------------------------------------------------------------------------------------------
# The metrics processor
# ------------------------------------------------------------------------------------------


class PathGeometryMetricsProcessor(MetricsProcessor):
    """torchtitan's ``MetricsProcessor`` that also measures the logged steps against x* (see the
    module's documentation). Set ``config.metrics = PathGeometryMetricsProcessor.Config(...)``;
    the Trainer builds it on every rank.

    Config fields, besides torchtitan's (``log_freq`` etc.):
        pathgeom_reference: x* for run 2 (a safetensors file written by run 1, or any format
            ``pathgeom analyze`` reads).
        pathgeom_record_to: run 1: write x_T (safetensors) and the loss trajectory here at
            :meth:`close` (not with pipeline parallelism).
        pathgeom_per_tensor: also log ``pathgeom/tensor/<name>/<metric>``.
        pathgeom_final_rtol: :meth:`close` warns when ||x_T - x*|| / ||x_0 - x*|| exceeds this.

    With neither a reference nor ``pathgeom_record_to`` it is torchtitan's processor, untouched.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(MetricsProcessor.Config):
        pathgeom_reference: str | None = None
        """x* (run 2): measure the logged steps against this checkpoint"""

        pathgeom_record_to: str | None = None
        """run 1: write x_T and the loss trajectory to this .safetensors file at the end"""

        pathgeom_per_tensor: bool = False
        """also log the metrics of every parameter tensor"""

        pathgeom_final_rtol: float = 1e-4
        """warn at the end when ||x_T - x*|| / ||x_0 - x*|| exceeds this"""

    def __init__(self, config: Config, *, parallel_dims, **kwargs: Any):
        self._model_parts = None
        self.measurer: _TitanMeasurer | None = None
        self._original = None
        self._step: int | None = None
        self._holder: torch.nn.Module | None = None
        self.latest: dict[str, float] = {}
        super().__init__(config, parallel_dims=parallel_dims, **kwargs)
        reference = getattr(config, "pathgeom_reference", None)
        record_to = getattr(config, "pathgeom_record_to", None)
        if reference is None and record_to is None:
            return
        ep = int(getattr(parallel_dims, "ep", 1) or 1)
        if ep > 1:
            raise ValueError(
                f"PathGeometryMetricsProcessor: expert parallelism (ep={ep}) is not supported: torchtitan reduces "
                "the expert and the dense gradient norms over different meshes"
            )
        if record_to is not None and int(getattr(parallel_dims, "pp", 1) or 1) > 1:
            raise ValueError(
                "PathGeometryMetricsProcessor: pathgeom_record_to with pipeline parallelism (pp > 1) is not supported: "
                "each stage holds other parameters; record x* in a run with pp = 1"
            )
        self.measurer = _TitanMeasurer(
            self,
            reference,
            record_to=record_to,
            per_tensor=bool(config.pathgeom_per_tensor),
            update="copy",
            final_rtol=config.pathgeom_final_rtol,
        )
        self.install()

    # -- what the Trainer hands over ---------------------------------------------------------

    @property
    def model_parts(self):
        return self._model_parts

    @model_parts.setter
    def model_parts(self, parts) -> None:
        """Set by ``Trainer.__init__``: the reference is checked against the model here."""
        self._model_parts = parts
        self._holder = None
        if parts is not None and self.measurer is not None:
            self.measurer.check_model(self.holder())

    def holder(self) -> torch.nn.Module:
        """The module whose names are x*'s: the one model part, or this rank's stages together."""
        if self._holder is None:
            parts = self._model_parts
            if not parts:
                raise RuntimeError(
                    "PathGeometryMetricsProcessor: no model_parts (torchtitan's Trainer sets them; in a loop of "
                    "your own set processor.model_parts and processor.optimizers before the first clip)"
                )
            pp = int(getattr(self.parallel_dims, "pp", 1) or 1)
            self._holder = unwrap_model(parts[0]) if len(parts) == 1 and pp == 1 else _Parts(parts)
        return self._holder

    def should_log(self, step: int) -> bool:
        self._step = int(step)  # the trainer asks at the start of every train_step
        return super().should_log(step)

    # -- the clip --------------------------------------------------------------------------

    def install(self) -> None:
        """Route ``torchtitan.distributed.utils.clip_grad_norm_`` through :meth:`clip_grad_norm_`."""
        if self._original is None:
            self._original = _tt_dist_utils.clip_grad_norm_
            _tt_dist_utils.clip_grad_norm_ = self.clip_grad_norm_

    def detach(self) -> None:
        """Give torchtitan its own ``clip_grad_norm_`` back."""
        if self._original is not None:
            if _tt_dist_utils.clip_grad_norm_ == self.clip_grad_norm_:
                _tt_dist_utils.clip_grad_norm_ = self._original
            self._original = None

    def clip_grad_norm_(self, parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None,
                        pp_mesh=None, ep_enabled=False):
        """torchtitan's ``clip_grad_norm_`` (same arguments, same result), measuring the gradient
        before it clips on the steps torchtitan logs."""
        original = self._original or _tt_dist_utils.clip_grad_norm_
        if isinstance(parameters, Tensor):
            parameters = [parameters]
        else:
            parameters = list(parameters)
        if self.measurer is not None:
            if ep_enabled:
                raise ValueError("PathGeometryMetricsProcessor: expert parallelism is not supported")
            self._finish_update()
            m = self.measurer
            m._pp_mesh = pp_mesh
            step = self._step if self._step is not None else (m._last_step or 0) + 1
            if step != m._seen_step:
                m.before_step(self.holder(), self._lr_optimizer(), step, None)
        return original(parameters, max_norm, norm_type, error_if_nonfinite, foreach, pp_mesh, ep_enabled)

    def _lr_optimizer(self):
        """The optimizer whose first param group's learning rate goes into the rows: the first
        one inside torchtitan's ``OptimizersContainer`` (whose own groups carry no ``lr``)."""
        opt = self.optimizers
        inner = getattr(opt, "optimizers", None)
        return inner[0] if isinstance(inner, (list, tuple)) and inner else opt

    def _finish_update(self) -> None:
        """The update rows of the measured step, once the optimizer has stepped (the parameters
        stay x_{t+1} until the next clip)."""
        m = self.measurer
        if m is not None and m._pending:
            m.refresh_for_update()
            m.after_step()

    # -- logging ---------------------------------------------------------------------------

    def log(self, step: int, global_avg_loss: float, global_max_loss: float, grad_norm: float,
            extra_metrics: dict[str, Any] | None = None, **kwargs: Any):
        m = self.measurer
        if m is not None:
            self._finish_update()
            if m._last_step == step:
                m._keep_loss(step, float(global_avg_loss))
            if m.measured_step == step:
                self.latest = m.scalars()
                extra_metrics = {**(extra_metrics or {}), **self.latest}
                get = lambda k: self.latest.get(f"pathgeom/{k}", math.nan)
                _tt_logger.info(
                    f"pathgeom step: {step:2}  rsi: {get('rsi'):.4e}  eb: {get('eb'):.4e}  cos: {get('cos'):.4f}  "
                    f"update_rsi: {get('update_rsi'):.4e}"
                )
        return super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra_metrics, **kwargs)

    # -- the end ---------------------------------------------------------------------------

    @property
    def final_distance_ratio(self) -> float | None:
        return self.measurer.final_distance_ratio if self.measurer is not None else None

    def finish(self) -> float | None:
        """End of training, on every rank (a collective): run 2's ||x_T - x*|| / ||x_0 - x*||,
        run 1 writes x* and the loss trajectory. :meth:`close` calls it."""
        m = self.measurer
        if m is None or m.finished or m._last_step is None:
            return self.final_distance_ratio
        self._finish_update()
        ratio = m.finish(self.holder())
        if ratio is not None:
            self.logger.log({"pathgeom/final_distance_ratio": ratio}, m._last_step)
        return ratio

    def close(self):
        try:
            self.finish()
        finally:
            self.detach()
            super().close()
