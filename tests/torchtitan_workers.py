"""torchtitan runs for tests/integrations/test_integrations_torchtitan.py, in spawned gloo processes on CPU.

torchtitan's ``Trainer.__init__`` needs an accelerator (docs/torchtitan.md), so the trainer is
put together here as ``Trainer.__init__`` does it, from torchtitan's own pieces: its llama3
``debugmodel`` (two layers), ``ParallelDims`` meshes, ``parallelize_llama`` (FSDP2 / TP / HSDP),
its loss, ``OptimizersContainer`` (AdamW), LR schedulers, ``batch_generator`` and
``Trainer.train_step`` itself, which calls ``dist_utils.clip_grad_norm_`` and the metrics
processor as in a real run. As torchtitan's CPU unit tests do, the CUDA-only bits are replaced:
``device_type`` is "cpu" for the meshes, and the memory monitor is a fake.

Each worker trains the same model twice from the same initial point: once with torchtitan's
plain ``MetricsProcessor``, once with ``PathGeometryMetricsProcessor`` measuring against a
random x*; an independent spy under the processor records the full (gathered) x_t, the pre-clip
gradient and the norm torchtitan returns, at every step. Rank 0 saves everything to OUT.
"""

from __future__ import annotations

import math
import os
import sys
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS, LOG_FREQ, SEQ, BATCH, LAYERS = 4, 2, 16, 2, 2
MAX_NORM = 0.05  # well below the gradient norms of this model: clipping bites at every step


class _MemoryMonitor:
    """What torchtitan's CPU tests put in place of its CUDA memory monitor."""

    device_name = "cpu"

    def get_peak_stats(self):
        from torchtitan.components.metrics import DeviceMemStats

        return DeviceMemStats(0.0, 0.0, 0.0, 0.0, 0, 0)

    def reset_peak_stats(self):
        pass


class _CapturingLogger:
    def __init__(self):
        self.logged: list[tuple[int, dict[str, Any]]] = []

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def close(self):
        pass


def cpu_torchtitan():
    """Point torchtitan's device choices at the CPU (its CPU unit tests patch the same)."""
    import torchtitan.components.metrics as tm
    import torchtitan.distributed.parallel_dims as pdm
    import torchtitan.tools.utils as tu

    pdm.device_type = "cpu"
    tm.build_device_memory_monitor = _MemoryMonitor
    tu.get_peak_flops = lambda name: 1e12


def model_config(layers=LAYERS):
    from torchtitan.models.llama3 import model_registry

    spec = model_registry("debugmodel", attn_backend="flex")
    cpu_model(spec, layers)
    return spec


def cpu_model(spec, layers=LAYERS):
    """Fewer layers; causal SDPA inside attention (FlexAttention has no backward on CPU; the
    SDPA module is torchtitan's own, which its maskless test configs use)."""
    from torchtitan.models.common.attention import ScaledDotProductAttention

    spec.model.layers = spec.model.layers[:layers]
    for layer in spec.model.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()


def parallel_dims(world, dp_replicate=1, tp=1, pp=1):
    from torchtitan.distributed import ParallelDims

    pd = ParallelDims(dp_replicate=dp_replicate, dp_shard=-1, cp=1, tp=tp, pp=pp, ep=1, world_size=world,
                      spmd_backend="partial_dtensor")
    pd.build_mesh()
    return pd


def trainer_config(metrics):
    from torchtitan.config import ParallelismConfig
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    cfg = llama3_debugmodel()
    cfg.training.seq_len, cfg.training.local_batch_size, cfg.training.steps = SEQ, BATCH, STEPS
    cfg.training.max_norm = MAX_NORM
    cfg.training.disable_cuda_graphs = True
    cfg.training.mixed_precision_param = "float32"
    cfg.parallelism = ParallelismConfig(spmd_backend="partial_dtensor")
    cfg.metrics = metrics
    return cfg


def gloo_sums(model):
    """torchtitan turns FSDP's gradient division off (factor 1), which FSDP2 then reduces with
    ReduceOp.PREMUL_SUM(1.0), an op gloo lacks: plain SUM, the same numbers."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_force_sum_reduction_for_comms(True)


def set_full(model, state):
    """Load full tensors into (possibly sharded) parameters: the same model on every layout."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for name, p in model.named_parameters():
            full = state[name].to(p.dtype)
            if isinstance(p, DTensor):
                p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements).to_local())
            else:
                p.copy_(full)


def full_of(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def random_state(spec, seed):
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in spec.model.build().named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    return {n: 0.05 * torch.randn(s, generator=gen) for n, s in shapes.items()}


def start_and_reference(spec, rank, out):
    """(init_state, xstar, ref_path): the run's random start and x* (seeds 1 and 2, the same on
    every rank); rank 0 writes x* beside OUT as safetensors, and every rank waits for it."""
    from safetensors.torch import save_file

    init_state = random_state(spec, seed=1)
    xstar = random_state(spec, seed=2)
    ref_path = os.path.join(os.path.dirname(out), "xstar.safetensors")
    if rank == 0:
        save_file({k: v.contiguous() for k, v in xstar.items()}, ref_path)
    dist.barrier()
    return init_state, xstar, ref_path


def batches(world_rank, world_batches):
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        tokens = torch.randint(0, 2048, (world_batches, BATCH, SEQ + 1), generator=gen)[world_rank]
        pos = torch.arange(SEQ).expand(BATCH, SEQ).contiguous()
        out.append(({"input": tokens[:, :-1].contiguous(), "positions": pos}, tokens[:, 1:].contiguous()))
    return out


def build_trainer(cfg, pd, init_state):
    """``Trainer.__init__``'s steps for one model part, on the CPU."""
    from torchtitan.components.loss import ChunkedLossWrapper
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.trainer import Trainer

    spec = cfg.model_spec
    cpu_model(spec)
    tr = Trainer.__new__(Trainer)
    tr.config, tr.device, tr.parallel_dims = cfg, torch.device("cpu"), pd
    dist_utils.set_spmd_backend(cfg.parallelism.spmd_backend)
    tr.metrics_processor = cfg.metrics.build(parallel_dims=pd, dump_folder="/nonexistent", config_dict=None)
    tr.metrics_processor.logger = _CapturingLogger()
    model_config = spec.model
    model_config.update_from_config(config=cfg)
    tr.model_config = model_config
    with torch.device("meta"):
        model = model_config.build()
    _, tr.metrics_processor.num_flops_per_token = model_config.get_nparams_and_flops(model, SEQ)
    tr.loss_fn = cfg.loss.build(compile_config=cfg.compile)
    model = spec.parallelize_fn(model, parallel_dims=pd, training=cfg.training, parallelism=cfg.parallelism,
                                compile_config=cfg.compile, ac_config=None, dump_folder="/nonexistent")
    gloo_sums(model)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    set_full(model, init_state)
    model.train()
    tr.model_parts = [model]
    if isinstance(tr.loss_fn, ChunkedLossWrapper):
        tr.loss_fn.set_lm_head(model.lm_head)
        model._skip_lm_head = True
    tr.optimizers = cfg.optimizer.build(model_parts=tr.model_parts)
    tr.lr_schedulers = cfg.lr_scheduler.build(optimizers=tr.optimizers, training_steps=cfg.training.steps)
    tr.metrics_processor.optimizers = tr.optimizers
    tr.metrics_processor.model_parts = tr.model_parts  # the reference is checked here
    tr.step, tr.ntokens_seen = 0, 0
    tr.gradient_accumulation_steps, tr.num_pipeline_parallel_microbatches = 1, 1
    tr.pp_has_first_stage = tr.pp_has_last_stage = True
    tr.checkpointer = SimpleNamespace(maybe_wait_for_staging=lambda: None)
    tr.train_context = dist_utils.get_spmd_context(parallel_dims=pd, spmd_typechecking=False)
    tr.fwd_bwd_fn = tr._forward_backward_body
    return tr


class Spy:
    """Installed under the processor: what torchtitan's clip sees and returns, gathered."""

    def __init__(self):
        import torchtitan.distributed.utils as du

        self.du, self.original, self.calls = du, du.clip_grad_norm_, []
        du.clip_grad_norm_ = self

    def __call__(self, parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None, pp_mesh=None,
                 ep_enabled=False):
        parameters = list(parameters)
        x = [full_of(p.detach()).double().clone() for p in parameters]
        g = [full_of(p.grad).double().clone() for p in parameters]
        norm = self.original(parameters, max_norm, norm_type, error_if_nonfinite, foreach, pp_mesh, ep_enabled)
        after = math.sqrt(sum(float(full_of(p.grad).double().pow(2).sum()) for p in parameters))
        self.calls.append({"x": x, "g": g, "norm": float(norm), "norm_after_clip": after,
                           "pp_mesh": pp_mesh is not None})
        return norm

    def remove(self):
        self.du.clip_grad_norm_ = self.original


def train(cfg, pd, init_state, rank, world_batches, batch_rank):
    tr = build_trainer(cfg, pd, init_state)
    data = tr.batch_generator(batches(batch_rank, world_batches))
    for _ in range(STEPS):
        tr.step += 1
        tr.train_step(data)
    final = {n: full_of(p.detach()).double().clone() for n, p in tr.model_parts[0].named_parameters()}
    names = [n for n, _ in tr.model_parts[0].named_parameters()]
    logged = tr.metrics_processor.logger.logged
    return tr, final, names, logged


def run(rank, world, out, layout):
    """One layout: dp_replicate/tp degrees (the rest is FSDP). Rank 0 saves OUT."""
    cpu_torchtitan()
    from pathgeom_fast.integrations.torchtitan import PathGeometryMetricsProcessor
    from torchtitan.components.metrics import MetricsProcessor

    pd = parallel_dims(world, **layout)
    init_state, xstar, ref_path = start_and_reference(model_config(), rank, out)
    if pd.dp_enabled:
        mesh = pd.get_mesh("batch")
        world_batches, batch_rank = mesh.size(), mesh.get_local_rank()
    else:
        world_batches, batch_rank = 1, 0

    # 1. torchtitan alone
    _, plain_final, _, plain_logged = train(
        trainer_config(MetricsProcessor.Config(log_freq=LOG_FREQ, disable_color_printing=True)),
        pd, init_state, rank, world_batches, batch_rank)
    # 2. the same run, measured (a spy under the processor's clip)
    spy = Spy()
    cfg = trainer_config(PathGeometryMetricsProcessor.Config(
        log_freq=LOG_FREQ, disable_color_printing=True, pathgeom_reference=ref_path, pathgeom_final_rtol=math.inf))
    tr, final, names, logged = train(cfg, pd, init_state, rank, world_batches, batch_rank)
    records = tr.metrics_processor.measurer.records
    ratio = tr.metrics_processor.finish()
    tr.metrics_processor.close()
    spy.remove()
    import torchtitan.distributed.utils as du

    restored = du.clip_grad_norm_ is spy.original
    if rank == 0:
        torch.save({
            "names": names, "xstar": {n: xstar[n].double() for n in names}, "calls": spy.calls,
            "plain_logged": plain_logged, "logged": logged, "plain_final": plain_final, "final": final,
            "records": records, "ratio": ratio, "restored": restored,
        }, out)


def run_pp(rank, world, out):
    """pp = 2: each rank holds one pipeline stage of the llama3 model (torchtitan's split: the
    layers of one half, the embedding on the first, norm and output on the last); torchtitan's
    clip reduces the norm over the pp mesh, the processor its sums."""
    cpu_torchtitan()
    from pathgeom_fast.integrations.torchtitan import PathGeometryMetricsProcessor
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig

    pd = parallel_dims(world, pp=2)
    spec = model_config(layers=2)
    init_state, xstar, ref_path = start_and_reference(spec, rank, out)
    stage = pd.get_mesh("pp").get_local_rank()
    with torch.device("meta"):
        model = spec.model.build()
    # torchtitan's pipeline split keeps the names: drop what the other stage holds
    keep = {"0"} if stage == 0 else {"1"}
    for k in list(model.layers.keys()):
        if k not in keep:
            del model.layers[k]
    if stage == 0:
        model.norm, model.lm_head = None, None
    else:
        model.tok_embeddings = None
    training = TrainingConfig(mixed_precision_param="float32")
    parallelism = ParallelismConfig(spmd_backend="partial_dtensor", pipeline_parallel_degree=2)
    model = spec.parallelize_fn(model, parallel_dims=pd, training=training, parallelism=parallelism,
                                compile_config=CompileConfig(), ac_config=None, dump_folder="/nonexistent")
    gloo_sums(model)
    model.to_empty(device="cpu")
    set_full(model, init_state)
    spy = Spy()
    proc = PathGeometryMetricsProcessor(
        PathGeometryMetricsProcessor.Config(log_freq=1, disable_color_printing=True, pathgeom_reference=ref_path,
                                            pathgeom_final_rtol=math.inf),
        parallel_dims=pd)
    proc.logger = _CapturingLogger()
    proc.num_flops_per_token = 1
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    proc.optimizers, proc.model_parts = opt, [model]
    gen = torch.Generator().manual_seed(11 + stage)
    import torchtitan.distributed.utils as du

    for step in (1, 2):
        for _, p in model.named_parameters():
            from torch.distributed.tensor import DTensor, distribute_tensor

            g = torch.randn(p.shape, generator=gen)
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g
        proc.should_log(step)
        norm = du.clip_grad_norm_([p for p in model.parameters()], MAX_NORM, foreach=True,
                                  pp_mesh=pd.get_optional_mesh("pp"), ep_enabled=False)
        opt.step()
        proc.data_loading_times.append(0.0)
        proc.log(step, 1.0, 1.0, float(norm))
    final = {n: full_of(p.detach()).double().clone() for n, p in model.named_parameters()}
    names = [n for n, _ in model.named_parameters()]
    ratio = proc.finish()
    proc.close()
    spy.remove()
    gathered = [None] * world
    dist.all_gather_object(gathered, {"names": names, "calls": spy.calls, "final": final,
                                      "logged": proc.logger.logged, "ratio": ratio})
    if rank == 0:
        torch.save({"stages": gathered, "xstar": {n: v.double() for n, v in xstar.items()}}, out)
