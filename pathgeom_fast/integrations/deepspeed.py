"""DeepSpeed ZeRO (stages 1, 2, 3): measure from each rank's own partitions, before clipping.

ZeRO keeps the gradients and the fp32 master weights in flat per-rank partitions, not in the
parameters' ``.grad``, and ``engine.step()`` clips inside. :class:`DeepSpeedMeasurer` hooks the
engine itself: building it wraps ``engine.backward`` and ``engine.step`` (on that engine object
only), so a DeepSpeed loop stays as it is::

    from pathgeom_fast.integrations.deepspeed import DeepSpeedMeasurer

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    geo = DeepSpeedMeasurer.recorder(engine, "run1/xstar.safetensors")               # run 1
    geo = DeepSpeedMeasurer(engine, reference="run1/xstar.safetensors", every=10)    # run 2
    for x, y in loader:                       # one micro-batch per iteration
        loss = loss_fn(engine(x), y)
        engine.backward(loss)                 # at an accumulation boundary: measured here
        engine.step()                         # the update rows, after the optimizer step
        if geo.measured_now:
            print(geo.scalars())              # {"pathgeom/rsi": ..., "pathgeom/eb": ..., ...}
    geo.finish()                              # every rank

**What is measured.** At the end of ``engine.backward`` on a gradient accumulation boundary
(``engine.is_gradient_accumulation_boundary()``), i.e. after ZeRO has reduced the gradient of
the whole optimizer step into each rank's partition and before ``engine.step()`` unscales,
clips and steps: a = <g, x_t - x*>, b = ||g||^2, c = ||x_t - x*||^2 with g the accumulated,
data-parallel averaged, pre-clip gradient and x_t the fp32 master weights. Each rank passes
only its own pieces: ZeRO-1/2 the fragment of every parameter inside its partition (the
parameter's ``_hp_mapping``: the fp32 master fragment, the gradient fragment and its start in
the flattened parameter), ZeRO-3 the rank's ``ceil(n / world)`` chunk of every flattened
parameter (``safe_get_local_fp32_param`` / ``safe_get_local_grad``, the padding cut off),
each with the matching slice of x*. One fused pass per reference and **one** all-reduce of
(a, b, c) over the engine's data-parallel group (:func:`pathgeom_fast.secant_stats` with
``group=``); no parameter or gradient is ever gathered. The ``update`` rows are the step the
optimizer took: u = x_t - x_{t+1} from a copy of the rank's fp32 master partition taken before
``engine.step()`` and the partition after it (one more fused pass and all-reduce).

**x\\*.** Each rank reads, one parameter at a time, only the parameters that have a fragment on
it and keeps only its slice (a checkpoint of any format ``pathgeom analyze`` reads, keys matched
to the module's names as there; ZeRO-3 shapes from ``ds_shape``). Run 1's
``record_to=`` writes the fp32 master weights (gathered with
``deepspeed.utils.safe_get_full_fp32_param``, once, at :meth:`finish`), so x\\* is the point
the optimizer reached, in fp32.

**The loss of a step** (recorded by run 1, compared by run 2) is the sum over the step's
micro-batches of the loss given to ``engine.backward`` divided by the accumulation steps (the
mean over the micro-batches); when the caller passes ``scale_wrt_gas=False`` (the Hugging Face
Trainer does, having divided the loss itself) the loss given is added as it is.

**Precision.** fp32, bf16 and fp16 (fp32 master weights; the gradient pieces are read in the
dtype ZeRO accumulates them in, as the optimizer reads them). With fp16 the pieces hold the
gradient times the loss scale S of that step (``engine.optimizer.loss_scale``, read before
``engine.step()`` changes it): a and b are divided by S and S^2 after the pass (weight-decay
rows: the decay multiplied by S in it), so nothing is copied. A step DeepSpeed skips because
the scaled gradient overflowed is logged with its non-finite gradient rows and a zero update.

**CPU offload** (``offload_optimizer`` / ``offload_param`` with ``device: cpu``): the pieces are
then ZeRO's CPU buffers, read where they are; the process group must be able to all-reduce CPU
tensors (gloo, or ``cpu:gloo,cuda:nccl`` beside NCCL).

**Refused before any step**, with a message: ZeRO stage 0 (no
partitions: the plain :class:`~.common.StepMeasurer` measures ``.grad``), NVMe offload, CPU
offload over a group that cannot reduce CPU tensors, ZeRO++ hierarchical partitions, MiCS,
pipeline or model parallelism (an ``mpu``), MoE groups reduced over other groups, probe
batches / full batch / snapshots (their gradients would go through the engine's reduction);
an optimizer that is not one of DeepSpeed's ZeRO optimizers.
"""

from __future__ import annotations

import math

import torch

from ..checkpoints.keys import match_keys, trainable
from ..checkpoints.reference import open_checkpoint
from ..path.tracker import PathTracker
from .deepspeed_zero import (
    _dp_group,
    _full_shapes,
    _reference_slices,
    _shape_twin,
    _zero_stage,
    _ZeroTracker,
    local_partitions,
    refuse_unsupported,
)
from .step_measurer import StepMeasurer

Tensor = torch.Tensor

__all__ = ["DeepSpeedMeasurer", "local_partitions"]

# ZeRO's partitions (where this rank's pieces are, the refused settings, x*'s slices and the
# tracker over the pieces) are in deepspeed_zero; the measurer and the Hugging Face glue here.


# ------------------------------------------------------------------------------------------
# The measurer
# ------------------------------------------------------------------------------------------


class DeepSpeedMeasurer(StepMeasurer):
    """Measure a DeepSpeed ZeRO-1/2/3 engine every ``every`` optimizer steps against x* (run 2),
    or record x* (run 1), from each rank's own partitions (see the module's documentation).

    Building it checks the engine (unsupported settings are refused with a ValueError) and the
    reference (key by key against ``engine.module``), then wraps ``engine.backward`` and
    ``engine.step`` so that the loop needs no other call; :meth:`detach` unwraps them. Build it
    on every rank, after ``deepspeed.initialize`` and before the first ``engine.backward``.

    Args:
        engine: the ``DeepSpeedEngine`` of ``deepspeed.initialize``.
        reference, every, record_to, weight_decay, per_tensor, update, backend,
        expected_losses, drift_rtol, final_rtol: as :class:`~pathgeom_fast.integrations.common.StepMeasurer`
            (``update="auto"`` is a copy of the rank's fp32 master partition).

    Read the values with :meth:`scalars` (one host copy; keys ``pathgeom/rsi``, ``eb``, ``cos``,
    ``eta_star``, ``update_*``), ``records``, :meth:`finish` (every rank: the replay's final
    distance ratio; run 1 writes x*) and :meth:`write_report` (one rank).
    """

    framework = "DeepSpeedMeasurer"
    loss_definition = (
        "DeepSpeed: the sum over the optimizer step's micro-batches of the loss given to engine.backward "
        "divided by the accumulation steps (as given when scale_wrt_gas=False)"
    )

    def __init__(self, engine, reference=None, every: int = 1, *, hook: bool = True, **kwargs):
        for bad in ("probe_batches", "full_batch", "probe_every", "snapshot_dir", "snapshot_every", "model", "loss_fn", "lags"):
            if kwargs.get(bad):
                raise ValueError(
                    f"DeepSpeedMeasurer: {bad}= is not supported (the gradients of extra batches, snapshots of a "
                    "partitioned model); measure the training steps, and probes with pathgeom analyze afterwards"
                )
            kwargs.pop(bad, None)
        refuse_unsupported(engine)
        super().__init__(reference, every, **kwargs)
        self.engine = engine
        self._twin = _shape_twin(engine.module) if _zero_stage(engine) == 3 else engine.module
        self.check_model(engine.module)
        self._step_loss: Tensor | None = None
        self._boundary_measured = False
        self._wrapped = None
        if hook:
            self._hook()

    @classmethod
    def recorder(cls, engine, path: str, **kwargs) -> "DeepSpeedMeasurer":
        """Run 1: write x_T (the fp32 master weights) and the loss trajectory to ``path`` at :meth:`finish`."""
        return cls(engine, None, record_to=path, **kwargs)

    # -- the engine's hooks ---------------------------------------------------------------

    def _hook(self) -> None:
        eng = self.engine
        backward, step = eng.backward, eng.step

        def backward_and_measure(loss, *args, **kwargs):
            out = backward(loss, *args, **kwargs)
            self.after_backward(loss, scaled=kwargs.get("scale_wrt_gas", True) is False)
            return out

        def step_and_measure(*args, **kwargs):
            boundary = eng.is_gradient_accumulation_boundary()
            out = step(*args, **kwargs)
            if boundary:
                self.after_engine_step()
            return out

        eng.backward, eng.step = backward_and_measure, step_and_measure
        self._wrapped = (backward, step)

    def detach(self) -> None:
        """Give the engine back its own ``backward`` and ``step``."""
        if self._wrapped is not None:
            for attr in ("backward", "step"):
                self.engine.__dict__.pop(attr, None)
            self._wrapped = None

    def after_backward(self, loss=None, scaled: bool = False) -> None:
        """After ``engine.backward(loss)`` (called by the hook): add this micro-batch's loss and,
        at an accumulation boundary, measure optimizer step ``engine.global_steps``."""
        eng = self.engine
        self._just_measured = False
        if loss is not None:
            part = loss.detach().float().reshape(()) if isinstance(loss, Tensor) else torch.tensor(float(loss))
            if not scaled:
                part = part / eng.gradient_accumulation_steps()
            self._step_loss = part if self._step_loss is None else self._step_loss + part
        if not eng.is_gradient_accumulation_boundary():
            return
        loss_t, self._step_loss = self._step_loss, None
        self.before_step(eng.module, eng.optimizer, int(eng.global_steps), loss_t)

    def after_engine_step(self) -> None:
        """After ``engine.step()`` at a boundary (called by the hook): the update rows."""
        self._just_measured = self.after_step()

    _just_measured = False

    @property
    def measured_now(self) -> bool:
        """True from the ``engine.step()`` that completed a measured optimizer step until the next
        ``engine.backward``: ``engine.step(); if geo.measured_now: log(geo.scalars())``."""
        return self._just_measured

    # -- StepMeasurer's pieces, for partitions ----------------------------------------------

    def check_model(self, model) -> None:
        if getattr(self, "engine", None) is None:
            return  # checked at the end of __init__, once the engine is known
        if model is self._checked:
            return
        for name, r in self.refs.items():
            if isinstance(r, str):
                match_keys(self._twin, self._headers[name], f"file {r}", role="reference")
            else:
                r.check_matches(self._twin)
        self._checked = model

    def _setup(self, model, optimizer) -> PathTracker:
        if self.tracker is not None:
            self.tracker.refresh(local_partitions(self.engine))
            return self.tracker
        eng = self.engine
        parts = local_partitions(eng)
        refs = {n: _reference_slices(eng, self._twin, r, n, parts) for n, r in self.refs.items()}
        self.tracker = _ZeroTracker(
            eng,
            parts,
            refs,
            optimizer=optimizer,
            weight_decay=self.weight_decay,
            per_tensor=self.per_tensor,
            update="copy" if self.update == "auto" else self.update,
            backend=self.backend,
            group=_dp_group(eng),
        )
        self.tracker.refresh(parts)
        return self.tracker

    def _write_reference(self, model, steps: int) -> None:
        from deepspeed.utils import safe_get_full_fp32_param

        full = _shape_twin(self.engine.module)
        by_name = dict(trainable(self.engine.module))
        values: dict[int, torch.nn.Parameter] = {}
        for name, p in trainable(full):
            # a collective per parameter, on every rank, once at the end of run 1
            value = safe_get_full_fp32_param(by_name[name]).detach().to("cpu", torch.float32).reshape(p.shape)
            values[id(p)] = torch.nn.Parameter(value, requires_grad=True)
        for name, p in list(full.named_parameters(remove_duplicate=False)):
            owner = full.get_submodule(name.rsplit(".", 1)[0]) if "." in name else full
            if id(p) in values:
                owner._parameters[name.rsplit(".", 1)[-1]] = values[id(p)]
        for name, _ in list(full.named_buffers()):
            owner = full.get_submodule(name.rsplit(".", 1)[0]) if "." in name else full
            del owner._buffers[name.rsplit(".", 1)[-1]]
        super()._write_reference(full, steps)

    def write_report(self, out_dir: str, title: str = "") -> dict:
        """As :meth:`StepMeasurer.write_report`, with D the whole model's trainable parameters."""
        from ..report.summary import write_report

        if self.tracker is None:
            raise RuntimeError(f"{self.framework}: nothing measured yet (no reference, or no measured step)")
        numel = sum(math.prod(s) for s, _ in _full_shapes(self.engine).values())
        extra = {"replay_final_distance_ratio": self.final_distance_ratio} if self.final_distance_ratio is not None else None
        return write_report(out_dir, self.records, self.per_tensor_records, numel, title, extra, findings=True)

    def finish(self, model=None) -> float | None:
        """End of training, on every rank (see :meth:`StepMeasurer.finish`)."""
        return super().finish(self.engine.module if model is None else model)


# ------------------------------------------------------------------------------------------
# Hugging Face Trainer (TrainingArguments(deepspeed=...))
# ------------------------------------------------------------------------------------------

_HF_UNSUPPORTED = ("probe_batches", "full_batch", "probe_every", "snapshot_dir", "snapshot_every", "loss_fn")


def hf_check(trainer, reference, kwargs) -> None:
    """At ``PathGeometryCallback.attach`` under DeepSpeed, before any step: the arguments the
    DeepSpeed measurer cannot honour are refused, and the reference is checked key by key
    against the model (by ``ds_shape`` where ZeRO-3 has partitioned it already)."""
    bad = [k for k in _HF_UNSUPPORTED if kwargs.get(k)]
    if bad:
        raise ValueError(
            f"PathGeometryCallback under DeepSpeed: {', '.join(bad)} not supported (the gradients of extra batches "
            "would go through the engine's reduction; snapshots of a partitioned model); measure the training steps, "
            "and probes with pathgeom analyze afterwards"
        )
    model = trainer.accelerator.unwrap_model(trainer.model)
    twin = _shape_twin(model)
    for name, r in StepMeasurer(reference, 1, expected_losses=None, record_to=kwargs.get("record_to")).refs.items():
        if isinstance(r, str):
            match_keys(twin, open_checkpoint(r).info(), f"file {r}", role="reference")
        else:
            r.check_matches(twin)


def hf_measurer(trainer, reference, every, kwargs, framework: str) -> DeepSpeedMeasurer:
    """The measurer of a Trainer's DeepSpeed engine (``trainer.deepspeed``, built by
    ``Trainer.train`` before ``on_train_begin``): the engine's ``backward`` and ``step`` are
    hooked, so the Trainer's clipping (a no-op there, after DeepSpeed's own step) is not."""
    engine = getattr(trainer, "deepspeed", None) or trainer.model_wrapped
    kwargs = {k: v for k, v in kwargs.items() if k not in _HF_UNSUPPORTED and k not in ("grad_clipping",)}
    m = DeepSpeedMeasurer(engine, reference, every, **kwargs)
    m.framework = framework
    m.loss_definition = (
        "transformers.Trainer: the sum over the optimizer step's micro-batches of what training_step returns "
        "(the mean over the micro-batches)"
    )
    return m
