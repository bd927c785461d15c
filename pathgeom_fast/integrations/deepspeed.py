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

from ..checkpoints.core import CheckpointError, Reference, match_keys, open_checkpoint, trainable
from ..path.tracker import PathTracker
from .common import StepMeasurer

Tensor = torch.Tensor

__all__ = ["DeepSpeedMeasurer", "local_partitions"]


# ------------------------------------------------------------------------------------------
# Where ZeRO keeps this rank's pieces
# ------------------------------------------------------------------------------------------


def _zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def _dp_group(engine):
    opt = engine.optimizer
    if _zero_stage(engine) == 3:
        return opt.dp_process_group
    groups = list(opt.real_dp_process_group)
    if any(g is not groups[0] for g in groups):
        raise ValueError("DeepSpeedMeasurer: parameter groups reduced over different process groups (MoE) are not supported")
    return groups[0]


def _group_rank_world(group) -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(group=group), dist.get_world_size(group=group)


def _offloaded(cfg) -> str | None:
    """'cpu' or 'nvme' for an offload section of the ZeRO config, None when nothing is offloaded."""
    device = getattr(cfg, "device", None) if cfg is not None else None
    device = None if device is None else str(getattr(device, "value", device))
    return None if device in (None, "none") else device


def _backend(engine) -> str:
    import torch.distributed as dist

    return str(dist.get_backend(_dp_group(engine)))


def _reduces_cpu_tensors(engine) -> bool:
    backend = _backend(engine)
    return "gloo" in backend or "mpi" in backend


def refuse_unsupported(engine) -> None:
    """Raise ValueError naming the first setting of ``engine`` that cannot be measured right."""
    try:
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError as exc:  # pragma: no cover - only without deepspeed
        raise ImportError("pathgeom_fast.integrations.deepspeed needs deepspeed: pip install 'deepspeed>=0.19'") from exc
    why = None
    stage = _zero_stage(engine)
    if stage == 0:
        why = ("ZeRO stage 0 has no partitions: the gradients are in .grad; measure with "
               "pathgeom_fast.integrations.StepMeasurer after engine.backward() and before engine.step()")
    elif stage not in (1, 2, 3):
        why = f"unknown ZeRO stage {stage}"
    elif not isinstance(engine.optimizer, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3)):
        why = f"the engine's optimizer is a {type(engine.optimizer).__name__}, not one of DeepSpeed's ZeRO optimizers"
    elif any(_offloaded(c) == "nvme" for c in (engine.zero_offload_optimizer(), engine.zero_offload_param())):
        why = "NVMe offload: the fp32 master weights and gradients are swapped out to files between uses"
    elif _offloaded(engine.zero_offload_optimizer()) == "cpu" and not _reduces_cpu_tensors(engine):
        why = (f"CPU offload over a process group whose backend ({_backend(engine)}) cannot all-reduce CPU tensors: "
               "the master weights and gradients are on the CPU; initialise the process group with a CPU backend too, "
               "e.g. backend='cpu:gloo,cuda:nccl'")
    elif getattr(engine, "mpu", None) is not None or type(engine).__name__ == "PipelineEngine":
        why = "model or pipeline parallelism: the data-parallel group does not hold the whole model"
    elif stage == 3 and (getattr(engine, "zero_hpz_partition_size", lambda: 1)() or 1) > 1:
        why = "ZeRO++ hierarchical partitions (zero_hpz_partition_size > 1)"
    elif stage == 3 and (getattr(engine._config, "mics_shard_size", -1) or -1) > 0:
        why = "MiCS sharding"
    if why is not None:
        raise ValueError(f"DeepSpeedMeasurer cannot measure this engine: {why}")
    _dp_group(engine)  # parameter groups reduced over different groups (MoE): refused here too


def local_partitions(engine) -> list[tuple[str, int, int, Tensor | None, Tensor | None]]:
    """This rank's pieces of every trainable parameter of ``engine.module``, in
    ``named_parameters()`` order: (name, start, numel, fp32 master piece, gradient piece), the
    pieces flat views of ZeRO's own buffers covering elements [start, start + numel) of the
    flattened parameter (numel 0 where the rank holds none of it). The gradient is the
    accumulated, averaged, unscaled, pre-clip one between ``engine.backward`` at an accumulation
    boundary and ``engine.step``; elsewhere it is None."""
    stage = _zero_stage(engine)
    out = []
    if stage == 3:
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad

        rank, _ = _group_rank_world(_dp_group(engine))
        for name, p in trainable(engine.module):
            size = p.ds_tensor.numel()
            start = rank * size
            n = max(0, min(size, p.ds_numel - start))
            w = safe_get_local_fp32_param(p).reshape(-1)[:n]
            try:
                g = safe_get_local_grad(p)
            except (KeyError, AttributeError, TypeError):
                g = None
            out.append((name, start, n, w, None if g is None else g.reshape(-1)[:n]))
        return out
    for name, p in trainable(engine.module):
        m = getattr(p, "_hp_mapping", None)
        if m is None:
            out.append((name, 0, 0, None, None))
            continue
        addr = m.lp_fragment_address
        w = m.hp_fragment.reshape(-1)
        try:
            g = m.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
        except (ValueError, KeyError, IndexError, TypeError):
            g = None
        if g is not None and g.numel() != addr.numel and g.numel() == p.numel():
            g = g.narrow(0, addr.start, addr.numel)  # a full-size accumulation buffer
        out.append((name, int(addr.start), int(addr.numel), w, g))
    return out


def master_device(engine) -> torch.device:
    """Where ZeRO keeps this rank's fp32 master partition (the accelerator, or the CPU with
    optimizer offload)."""
    opt = engine.optimizer
    flat = opt.fp32_partitioned_groups_flat if _zero_stage(engine) == 3 else opt.single_partition_of_fp32_groups
    return flat[0].device


def _full_shapes(engine) -> dict[str, tuple[torch.Size, torch.dtype]]:
    return {n: (getattr(p, "ds_shape", p.shape), p.dtype) for n, p in trainable(engine.module)}


class _ShapeTwin(torch.nn.Module):
    """The module's names, shapes and dtypes on the meta device (ZeRO-3 parameters are empty):
    what the reference is checked against."""


def _shape_twin(module: torch.nn.Module) -> torch.nn.Module:
    root = _ShapeTwin()
    made: dict[int, torch.nn.Parameter] = {}

    def owner(path: str) -> torch.nn.Module:
        m = root
        for part in path.split(".")[:-1]:
            if part not in m._modules:
                m._modules[part] = _ShapeTwin()
            m = m._modules[part]
        return m

    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in made:
            shape = getattr(p, "ds_shape", p.shape)
            made[id(p)] = torch.nn.Parameter(torch.empty(shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad)
        owner(name)._parameters[name.rsplit(".", 1)[-1]] = made[id(p)]
    for name, b in module.named_buffers():
        owner(name)._buffers[name.rsplit(".", 1)[-1]] = torch.empty(b.shape, dtype=b.dtype, device="meta")
    return root


def _reference_slices(engine, twin, spec, name: str, parts) -> Reference:
    """x* of this rank's pieces (fp32, flat, on the master weights' device), as a Reference over
    the local holder's names."""
    device = master_device(engine)
    slices = []
    if isinstance(spec, Reference):
        by_name = dict(zip(spec.names, spec.tensors))
        for (pname, start, n, _, _) in parts:
            if pname not in by_name:
                raise CheckpointError(f"reference {spec.source or spec.name} has no tensor for {pname!r}")
            slices.append(by_name[pname].detach().reshape(-1)[start : start + n].to(device, torch.float32).clone())
        source = spec.source or spec.name
    else:
        ck = open_checkpoint(spec)
        km = match_keys(twin, ck.info(), f"file {spec}", role="reference")
        shapes = _full_shapes(engine)
        for (pname, start, n, _, _) in parts:
            if n == 0:
                slices.append(torch.empty(0, dtype=torch.float32, device=device))
                continue
            key = km.keys[pname]
            full = torch.empty(shapes[pname][0], dtype=torch.float32)
            ck.reader.read({key: full})  # one parameter at a time
            slices.append(full.reshape(-1)[start : start + n].to(device, copy=True))
            del full
        ck.reader.release()
        source = spec
    return Reference([f"p{i}" for i in range(len(parts))], slices, name=name, source=source)


class _Pieces(torch.nn.Module):
    """This rank's fp32 master pieces as parameters (aliases of ZeRO's buffers, no copy)."""

    def __init__(self, parts, device):
        super().__init__()
        for i, (_, _, n, w, _) in enumerate(parts):
            t = w.detach() if w is not None else torch.empty(0, dtype=torch.float32, device=device)
            self.register_parameter(f"p{i}", torch.nn.Parameter(t, requires_grad=True))


class _ZeroTracker(PathTracker):
    """A PathTracker over this rank's pieces, reduced over the data-parallel group."""

    def __init__(self, engine, parts, refs, **kwargs):
        self.engine = engine
        self.pieces = _Pieces(parts, master_device(engine))
        super().__init__(self.pieces, refs, **kwargs)
        self.names = [n for n, *_ in parts]  # per-tensor rows under the module's names
        self._local_grads: list[Tensor] | None = None

    def refresh(self, parts) -> None:
        """Point the pieces at ZeRO's current buffers; keep the gradients of this step and the
        loss scale they carry (fp16; 1 otherwise)."""
        self._scale = float(self.engine.optimizer.loss_scale)
        grads = []
        for p, (name, _, n, w, g) in zip(self.params, parts):
            if w is not None and (w.data_ptr() != p.data_ptr() or w.shape != p.shape):
                p.data = w.detach()
            if n and g is None:
                raise RuntimeError(
                    f"DeepSpeedMeasurer: no gradient partition for {name!r}: measure after engine.backward() at a "
                    "gradient accumulation boundary and before engine.step()"
                )
            grads.append(g if g is not None else torch.zeros_like(p))
        self._local_grads = grads

    _scale = 1.0

    @torch.no_grad()
    def _stats(self, grads, ref, *, weight_decay: float = 0.0, per_tensor: bool = False, idx=None) -> Tensor:
        """The statistics of g = (scaled gradient) / S without a copy: those of the scaled
        gradient (with weight decay times S) with a divided by S and b by S^2."""
        S = self._scale
        if S == 1.0:
            return super()._stats(grads, ref, weight_decay=weight_decay, per_tensor=per_tensor, idx=idx)
        s = super()._stats(grads, ref, weight_decay=weight_decay * S, per_tensor=per_tensor, idx=idx)
        return s * s.new_tensor([1.0 / S, 1.0 / (S * S), 1.0])

    def _grads(self, step: int) -> list[Tensor]:
        if self._local_grads is None:
            raise RuntimeError(f"DeepSpeedMeasurer: step {step} has no gradient pieces")
        grads, self._local_grads = self._local_grads, None
        return grads


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
