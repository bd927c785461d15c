"""DeepSpeed ZeRO runs for tests/integrations/test_integrations_deepspeed.py, in their own processes.

``python tests/deepspeed_workers.py OUT WORLD`` runs, in WORLD gloo processes on DeepSpeed's
CPU accelerator, ZeRO stages 1, 2 and 3: run 1 records x*, run 2 measures against it, and rank 0
saves (torch.save, OUT/world{WORLD}.pt) what the measurer logged together with independent
captures: the full fp32 master weights and the full pre-clip gradient of every optimizer step
(DeepSpeed's own ``safe_get_full_fp32_param`` / ``safe_get_full_grad``), the parameters after
the step, and DeepSpeed's global gradient norm. With WORLD 1 it also records the refusals.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STAGES = (1, 2, 3)
STEPS, ACCUM, MICRO = 4, 2, 8  # optimizer steps, micro-batches per step, global micro-batch
CLIP, LR, WD = 0.5, 1e-2, 0.01


def data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(STEPS * ACCUM * MICRO, 8, generator=gen), torch.randint(0, 3, (STEPS * ACCUM * MICRO,), generator=gen)


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def ds_config(stage, world, **extra):
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO // world,
        "gradient_accumulation_steps": ACCUM,
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every parameter partitioned
    cfg.update(extra)
    return cfg


def make_engine(stage, world, **extra):
    import deepspeed

    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage, world, **extra))
    return engine


def full_fp32(engine):
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(p).detach().double().reshape(-1).clone() for p in engine.module.parameters()]


def full_grad(engine):
    from deepspeed.utils import safe_get_full_grad

    return [safe_get_full_grad(p).detach().double().reshape(-1).clone() for p in engine.module.parameters()]


def train(engine, rank, world, geo=None, capture=False, dtype=torch.float32):
    X, Y = data()
    X = X.to(dtype)
    per = MICRO // world
    out = {"x": [], "g": [], "x_next": [], "norm": [], "scalars": [], "losses": [], "scale": []}
    for i in range(STEPS * ACCUM):
        lo = i * MICRO + rank * per
        loss = torch.nn.functional.cross_entropy(engine(X[lo : lo + per]), Y[lo : lo + per])
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        if capture and boundary:
            out["x"].append(torch.cat(full_fp32(engine)))
            out["g"].append(torch.cat(full_grad(engine)))  # as DeepSpeed holds it: times the loss scale in fp16
            out["scale"].append(float(engine.optimizer.loss_scale))
        engine.step()
        if boundary:
            if capture:
                out["x_next"].append(torch.cat(full_fp32(engine)))
                out["norm"].append(float(engine.get_global_grad_norm()))
            if geo is not None and geo.refs:
                out["scalars"].append(geo.scalars() if geo.measured_now else None)
    return out


def count_collectives(geo):
    """Collectives issued inside the measurer's two hooks, per call: {hook: [count, ...]}."""
    from torch.distributed.tensor.debug import CommDebugMode

    counts = {"after_backward": [], "after_step": []}
    for name in counts:
        inner = getattr(geo, name)

        def counted(*args, _inner=inner, _name=name, **kwargs):
            with CommDebugMode() as comm:
                out = _inner(*args, **kwargs)
            counts[_name].append({str(op): n for op, n in comm.get_comm_counts().items() if n})
            return out

        setattr(geo, name, counted)
    return counts


def run_stage(rank, world, stage, out_dir):
    from pathgeom_fast.integrations.deepspeed import DeepSpeedMeasurer

    xstar = os.path.join(out_dir, f"world{world}_stage{stage}_xstar.safetensors")
    engine = make_engine(stage, world)
    rec = DeepSpeedMeasurer.recorder(engine, xstar)
    train(engine, rank, world, rec)
    rec.finish()
    engine = make_engine(stage, world)
    geo = DeepSpeedMeasurer(engine, reference=xstar, every=1, weight_decay=WD, per_tensor=True)
    comms = count_collectives(geo)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(drifts|retrace|does not match).*")  # no drift or replay warning
        res = train(engine, rank, world, geo, capture=True)
        res["ratio"] = geo.finish()
    import torch.distributed as dist

    from pathgeom_fast.integrations.deepspeed import local_partitions

    mine = [n for _, _, n, _, _ in local_partitions(engine)]  # elements of each parameter on this rank
    every = [None] * world
    dist.all_gather_object(every, mine)
    res["local_numel"] = every
    res["collectives"] = comms
    res["records"] = geo.records
    res["per_tensor"] = geo.per_tensor_records
    res["xstar"] = xstar
    res["run1_losses"] = rec.losses
    res["losses"] = geo.losses
    if rank == 0 and stage == 1:
        res["summary"] = geo.write_report(os.path.join(out_dir, f"world{world}_report"))
    # bf16 weights, fp32 master weights, against the fp32 run's x*
    engine = make_engine(stage, world, bf16={"enabled": True})
    geo_bf16 = DeepSpeedMeasurer(engine, reference=xstar, every=1)
    res["bf16"] = train(engine, rank, world, geo_bf16, capture=True, dtype=torch.bfloat16)
    geo_bf16.finish()
    # fp16 with dynamic loss scaling (2^8 to start)
    engine = make_engine(stage, world, fp16={"enabled": True, "initial_scale_power": 8})
    geo_fp16 = DeepSpeedMeasurer(engine, reference=xstar, every=1, weight_decay=WD)
    res["fp16"] = train(engine, rank, world, geo_fp16, capture=True, dtype=torch.float16)
    res["fp16"]["skipped"] = int(engine.skipped_steps)
    geo_fp16.finish()
    if stage == 2:  # a loss scale so large that every step overflows and is skipped
        engine = make_engine(stage, world, fp16={"enabled": True, "initial_scale_power": 30})
        geo_ovf = DeepSpeedMeasurer(engine, reference=xstar, every=1)
        res["fp16_overflow"] = train(engine, rank, world, geo_ovf, capture=True, dtype=torch.float16)
        res["fp16_overflow"]["skipped"] = int(engine.skipped_steps)
        res["fp16_overflow"]["records"] = geo_ovf.records
    # CPU offload of the optimizer (ZeRO-3: and of the parameters)
    zero = {"stage": stage, "offload_optimizer": {"device": "cpu"}}
    if stage == 3:
        zero.update(offload_param={"device": "cpu"}, stage3_param_persistence_threshold=0)
    engine = make_engine(stage, world, zero_optimization=zero, zero_force_ds_cpu_optimizer=False)
    geo_off = DeepSpeedMeasurer(engine, reference=xstar, every=1)
    res["offload"] = train(engine, rank, world, geo_off, capture=True)
    geo_off.finish()
    # every: 2 measures steps 0 and 2 only
    engine = make_engine(stage, world)
    geo2 = DeepSpeedMeasurer(engine, reference=xstar, every=2)
    res["collectives2"] = count_collectives(geo2)
    res["every2"] = train(engine, rank, world, geo2)["scalars"]
    geo2.finish()
    return res


def refusals(world):
    from pathgeom_fast.integrations.deepspeed import DeepSpeedMeasurer

    out = {}
    cases = {
        "nvme": dict(stage=2, nvme_flag=True),
        "stage0": dict(stage=0),
    }
    for name, kw in cases.items():
        stage = kw.pop("stage")
        nvme = kw.pop("nvme_flag", False)
        try:
            engine = make_engine(stage, world, **kw)
            if nvme:  # no NVMe here either: an engine whose config says the optimizer state is on NVMe
                import types

                engine.zero_offload_optimizer = lambda: types.SimpleNamespace(device="nvme")
        except Exception as exc:  # this DeepSpeed build cannot even set it up here
            out[name] = f"setup failed: {type(exc).__name__}: {exc}"
            continue
        try:
            DeepSpeedMeasurer(engine, reference=None, record_to=os.devnull + ".safetensors")
            out[name] = "accepted"
        except ValueError as exc:
            out[name] = f"refused: {exc}"
    return out


# ------------------------------------------------------------------------------------------
# Hugging Face Trainer with TrainingArguments(deepspeed=...)
# ------------------------------------------------------------------------------------------

HF_STEPS, HF_BATCH, HF_ACCUM, HF_CLIP = 4, 4, 2, 0.5


def hf_data():
    ids = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": t, "labels": t} for t in ids]


def hf_trainer(out_dir, stage=None):
    """A 1-layer GPT-2 Trainer: accumulation 2, clipping that bites; DeepSpeed ZeRO ``stage`` or none."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    ds = None
    if stage is not None:
        ds = {
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
        }
        if stage == 3:
            ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=HF_BATCH, gradient_accumulation_steps=HF_ACCUM,
        max_steps=HF_STEPS, max_grad_norm=HF_CLIP, learning_rate=3e-3, logging_steps=2, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, deepspeed=ds,
        optim="adamw_torch",
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=16))
    return Trainer(model=model, args=args, train_dataset=hf_data())


def hf_capture(trainer):
    """A callback capturing, independently of the measurer, the full fp32 master weights and
    the full pre-clip gradient at each boundary (DeepSpeed's own APIs) and the weights after."""
    from transformers import TrainerCallback

    cap = {"x": [], "g": [], "x_next": [], "norm": []}

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            engine = trainer.deepspeed
            backward, step = engine.backward, engine.step  # the measurer's hooks: capture after them

            def backward_and_capture(loss, *a, **k):
                out = backward(loss, *a, **k)
                if engine.is_gradient_accumulation_boundary():
                    cap["x"].append(torch.cat(full_fp32(engine)))
                    cap["g"].append(torch.cat(full_grad(engine)))
                return out

            def step_and_capture(*a, **k):
                boundary = engine.is_gradient_accumulation_boundary()
                out = step(*a, **k)
                if boundary:
                    cap["x_next"].append(torch.cat(full_fp32(engine)))
                    cap["norm"].append(float(engine.get_global_grad_norm()))
                return out

            engine.backward, engine.step = backward_and_capture, step_and_capture

    trainer.add_callback(Capture())
    return cap


def hf_plain_worker(rank, world, out_dir):
    """The same Trainer runs without DeepSpeed (DDP over the same gloo processes), measured
    against the x* each DeepSpeed stage recorded."""
    from pathgeom_fast.integrations.hf import PathGeometryCallback

    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    results = {}
    for stage in STAGES:
        trainer = hf_trainer(os.path.join(out_dir, f"hfplain{stage}"), None)
        PathGeometryCallback.attach(trainer, reference=os.path.join(out_dir, f"hf_stage{stage}_xstar.safetensors"), every=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a replay of another engine's run: rounding-level drift is expected
            trainer.train()
        results[stage] = trainer.state.log_history
    if rank == 0:
        torch.save(results, os.path.join(out_dir, f"hf_plain_world{world}.pt"))


def hf_worker(rank, world, out_dir):
    from pathgeom_fast.integrations.hf import PathGeometryCallback

    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    results = {}
    for stage in STAGES:
        xstar = os.path.join(out_dir, f"hf_stage{stage}_xstar.safetensors")
        trainer = hf_trainer(os.path.join(out_dir, f"hf{stage}-run1"), stage)
        PathGeometryCallback.record_reference(trainer, xstar)
        trainer.train()
        trainer = hf_trainer(os.path.join(out_dir, f"hf{stage}-run2"), stage)
        cb = PathGeometryCallback.attach(trainer, reference=xstar, every=1)
        cap = hf_capture(trainer)
        trainer.train()
        cap["log"] = trainer.state.log_history
        cap["xstar"] = xstar
        cap["ratio"] = cb.final_distance_ratio
        cap["names"] = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
        results[stage] = cap
    try:
        trainer = hf_trainer(os.path.join(out_dir, "hf-probe"), 2)
        PathGeometryCallback.attach(trainer, reference=xstar, every=1, probe_batches=[hf_data()[:4]], probe_every=1)
        results["probe_refusal"] = "accepted"
    except ValueError as exc:
        results["probe_refusal"] = str(exc)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, f"hf_world{world}.pt"))


def worker(rank, world, out_dir):
    os.environ["LOCAL_RANK"] = str(rank)
    results = {stage: run_stage(rank, world, stage, out_dir) for stage in STAGES}
    if world == 1:
        results["refusals"] = refusals(world)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, f"world{world}.pt"))


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from dist_workers import launch

    out_dir, world = sys.argv[1], int(sys.argv[2])
    mode = sys.argv[3] if len(sys.argv) > 3 else ""
    launch({"hf": hf_worker, "hf-plain": hf_plain_worker}.get(mode, worker), world, out_dir)


# ------------------------------------------------------------------------------------------
# engine.save_checkpoint folders, for tests/checkpoints/test_checkpoints_deepspeed.py
# ------------------------------------------------------------------------------------------

SAVE_STEPS = 2  # optimizer steps, a checkpoint after each


def full_fp32_named(engine):
    """{name: full fp32 master weight} by DeepSpeed's own ``safe_get_full_fp32_param`` (a
    collective under ZeRO-3: every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}


def save_worker(rank, world, out_dir, cases):
    """For each (stage, precision) in ``cases``: SAVE_STEPS optimizer steps, saving
    ``OUT/world{W}_stage{S}[_bf16]/global_stepN`` after each; rank 0 saves the fp32 master weights
    captured at each save, the module's weights and the optimizer's lr to
    ``OUT/saved_world{W}.pt``."""
    os.environ["LOCAL_RANK"] = str(rank)
    X, Y = data()
    per = MICRO // world
    captures = {}
    for stage, precision in cases:
        extra = {"bf16": {"enabled": True}} if precision == "bf16" else {}
        engine = make_engine(stage, world, **extra)
        name = f"world{world}_stage{stage}" + (f"_{precision}" if precision != "fp32" else "")
        ckpt = os.path.join(out_dir, name)
        cap = {"dir": ckpt, "fp32": {}, "module": {}, "lr": {}}
        i = 0
        while len(cap["fp32"]) < SAVE_STEPS:
            lo = i * MICRO + rank * per
            x = X[lo : lo + per].to(torch.bfloat16 if precision == "bf16" else torch.float32)
            engine.backward(torch.nn.functional.cross_entropy(engine(x), Y[lo : lo + per]))
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            i += 1
            if boundary:
                step = engine.global_steps
                engine.save_checkpoint(ckpt)
                cap["fp32"][step] = full_fp32_named(engine)
                if stage < 3:
                    cap["module"][step] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
                cap["lr"][step] = float(engine.optimizer.param_groups[0]["lr"])
        captures[(stage, precision)] = cap
    if rank == 0:
        torch.save(captures, os.path.join(out_dir, f"saved_world{world}.pt"))
