"""Where DeepSpeed ZeRO (stages 1, 2, 3) keeps this rank's pieces, and the measurement over them.

The fragments of the parameters in this rank's partitions (the fp32 master piece, the gradient
piece, the start in the flattened parameter), the engine settings that are refused, the module's
shapes on the meta device (ZeRO-3 parameters are empty), this rank's slices of x*, and
``_ZeroTracker``: a :class:`~pathgeom_fast.path.tracker.PathTracker` over the pieces, reduced
over the data-parallel group. :mod:`pathgeom_fast.integrations.deepspeed` (``DeepSpeedMeasurer``,
the Hugging Face glue) builds on it and documents what is measured.
"""

from __future__ import annotations

import torch

from ..checkpoints.keys import match_keys, trainable
from ..checkpoints.reader import CheckpointError
from ..checkpoints.reference import Reference, open_checkpoint
from ..path.tracker import PathTracker

Tensor = torch.Tensor

__all__ = ["local_partitions", "master_device", "refuse_unsupported"]


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
