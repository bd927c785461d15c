"""The main job: the paper's two-run protocol on a real workload, on CPU, in minutes.

``pathgeom demo --task mlp|cnn|resnet|wide-mlp|lm`` (the workloads and their ablation switches, ``--no-batchnorm``,
``--no-skip``, ``--init-scale``, are in :mod:`pathgeom_fast.tasks`).
Run 1 trains from a seed and saves x* (and snapshots); with ``--cross-seed`` a second run 1
from another seed (another initialisation and data order) gives a second end point x*'; run 2
replays run 1's path exactly, with a :class:`PathTracker` measuring every step against x*
(and x*', and x_0 with ``--x0-reference``), and writes records.csv, summary.json,
geometry.png and findings.md (the paper's claims, each with its numbers and a verdict).

What run 2 measures (rows of records.csv; see :mod:`pathgeom_fast.tracker`): the training
minibatch gradient (before clipping), the optimizer's update, K fixed probe minibatches and
the full-batch gradient every ``--probe-every`` steps, their weight-decay variants
(``*_wd``, g + wd x) with ``--weight-decay``, and the lagged orthogonal cosine
(``lagged``: components of g_t and g_{t+k} orthogonal to their own x - x*).

``make_model``, ``make_data`` and ``loss_fn`` follow the contract of ``pathgeom analyze``,
so ``pathgeom analyze DIR/snapshots --model pathgeom_fast.demo:make_model
--data pathgeom_fast.demo:make_data`` re-analyses the default demo's snapshots (other tasks:
the entry points in :mod:`pathgeom_fast.tasks`).

Under ``torchrun --nproc-per-node N -m pathgeom_fast.cli demo`` (gloo on CPU, NCCL on GPUs)
the model is sharded with FSDP2 ``fully_shard`` and every batch is split across the ranks;
the loss is scaled so that FSDP2's gradient averaging gives exactly the global-mean gradient,
so the numbers equal the single-process demo's (to rounding). x* is read back sharded.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from . import tasks
from ..report import summary as report
from ..checkpoints.snapshots import SnapshotRecorder, save_snapshot
from ..checkpoints.reference import Reference
from ..path.tracker import PathTracker

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "adam-l2")
SCHEDULES = ("constant", "cosine", "step", "warmup-cosine")
MODELS = ("mlp", "cnn")  # the old --model choices, now tasks
TASKS = tasks.TASKS
PAPER_LAGS = (1, 2, 5, 10, 20, 50)
SIZE_FIELDS = ("width", "depth", "context", "train_size", "batchnorm", "skip", "init_scale")  # with the ablation switches

# Settings every task shares unless it says otherwise (see tasks.TASK_SPECS[...].defaults).
_COMMON = {"steps": 400, "batch_size": 32, "optimizer": "momentum", "lr": 0.05, "schedule": "cosine", "weight_decay": 0.0,
           "clip_grad_norm": 0.0, "probe_batches": 8, "probe_every": 10, "snapshot_every": 50, "lag_every": 10,
           "cross_seed": False, "x0_reference": True}


@dataclass
class DemoConfig:
    """Settings of one demo. ``None`` means "the task's default" (resolved when built)."""

    out: str = "pathgeom-demo"
    task: str | None = None
    steps: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    schedule: str | None = None
    weight_decay: float | None = None
    clip_grad_norm: float | None = None  # 0: no clipping; the tracker measures before clipping
    model: str | None = None  # old name of --task (mlp or cnn)
    probe_batches: int | None = None
    probe_every: int | None = None
    full_batch: bool = True
    per_tensor: bool = False
    snapshot_every: int | None = None  # 0: only the end point
    lags: tuple[int, ...] = PAPER_LAGS  # (): no lagged cosine
    lag_every: int | None = None
    cross_seed: bool | None = None
    x0_reference: bool | None = None
    width: int | None = None
    depth: int | None = None
    context: int | None = None
    train_size: int | None = None
    batchnorm: bool = True  # False: the task's BatchNorm layers dropped (cnn, resnet)
    skip: bool = True  # False: the residual connections dropped (resnet)
    init_scale: float = 1.0  # every parameter of the default initialisation times this
    threads: int | None = None  # None: torch's default, capped at the cores the load average leaves free
    device: str = "cpu"
    seed: int = 0
    backend: str = "auto"
    progress: bool = True
    fsdp: bool = False  # set when launched with torchrun (WORLD_SIZE > 1)

    def __post_init__(self):
        if self.model is not None and self.task is not None and self.model != self.task:
            raise ValueError(f"--model {self.model!r} and --task {self.task!r} disagree; --model is the old name of --task")
        self.task = self.task or self.model or "mlp"
        spec = tasks.get_task(self.task)
        self.model = self.task
        for key, value in {**_COMMON, **spec.defaults}.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for key in ("steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        for key in ("probe_batches", "probe_every", "snapshot_every", "weight_decay", "clip_grad_norm"):
            if getattr(self, key) < 0:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 0, got {getattr(self, key)}")
        self.lags = tuple(sorted({int(k) for k in self.lags or ()}))
        if any(k < 1 for k in self.lags):
            raise ValueError(f"--lags must be positive integers, got {self.lags}")
        if self.lag_every < 1:
            raise ValueError(f"--lag-every must be >= 1, got {self.lag_every}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        spec.check_ablations(self.sizes)

    @property
    def sizes(self) -> dict:
        return {k: getattr(self, k) for k in SIZE_FIELDS}

    @property
    def cross_seed_value(self) -> int:
        return self.seed + 1


# ------------------------------------------------------------------------------------------
# Model, data, loss (the `pathgeom analyze` contract for the default task)
# ------------------------------------------------------------------------------------------


def make_data(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as (X float32 [1797, 64] standardised, y int64 [1797])."""
    return tasks.digits_data(device)


def make_model(kind: str = "mlp") -> torch.nn.Module:
    """The model of a task at its default size (``mlp`` by default)."""
    if kind not in TASKS:
        raise ValueError(f"model must be one of {TASKS}, got {kind!r}")
    return tasks.get_task(kind).model()


loss_fn = tasks.loss_fn


def sharded_loss_fn(model: torch.nn.Module, batch) -> torch.Tensor:
    """Data-parallel loss: this rank's slice of the batch, scaled so that FSDP2's average of
    the per-rank gradients is the gradient of the mean loss over the whole batch."""
    import torch.distributed as dist

    x, y = batch
    rank, world = dist.get_rank(), dist.get_world_size()
    logits = model(x[rank::world])
    mine = y[rank::world]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), mine.reshape(-1), reduction="sum")
    return total * (world / y.numel())


def _global_loss(loss: torch.Tensor) -> torch.Tensor:
    """The whole batch's mean loss from the per-rank scaled losses (for logging)."""
    import torch.distributed as dist

    total = loss.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def shard_model(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """FSDP2: shard every Linear/Conv2d, then the root."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def lr_at(step: int, cfg: DemoConfig) -> float:
    t = step / max(1, cfg.steps)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        return cfg.lr * (0.1 ** int(t * 3))
    if cfg.schedule == "warmup-cosine":
        w = 0.1
        return cfg.lr * (t / w if t < w else 0.5 * (1 + math.cos(math.pi * (t - w) / (1 - w))))
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")


def make_optimizer(cfg: DemoConfig, params) -> torch.optim.Optimizer:
    """sgd; momentum (0.9); nesterov (0.9); adam/adamw = AdamW (decoupled decay); adam-l2 =
    torch.optim.Adam with coupled L2 (weight_decay added to the gradient, as the paper's code)."""
    wd = cfg.weight_decay
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=wd)
    if cfg.optimizer == "momentum":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=wd)
    if cfg.optimizer == "nesterov":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=wd)
    if cfg.optimizer in ("adam", "adamw"):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=wd)
    if cfg.optimizer == "adam-l2":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=wd)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}")


def batch_order(n: int, cfg: DemoConfig, seed: int | None = None) -> list[torch.Tensor]:
    """The data order: seeded epochs of random permutations, identical in both runs."""
    seed = cfg.seed if seed is None else seed
    gen = torch.Generator().manual_seed(seed + 1)
    if cfg.batch_size > n:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the training set ({n} examples)")
    out, perm, pos = [], torch.randperm(n, generator=gen), 0
    for _ in range(cfg.steps):
        if pos + cfg.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        out.append(perm[pos : pos + cfg.batch_size])
        pos += cfg.batch_size
    return out


def probe_set(X, y, cfg: DemoConfig):
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    return [(X[i], y[i]) for i in (torch.randperm(len(X), generator=gen)[: cfg.batch_size] for _ in range(cfg.probe_batches))]


def full_batches(X, y, cfg: DemoConfig):
    """The whole training set in chunks (their size-weighted mean gradient is the full-batch gradient)."""
    chunk = tasks.get_task(cfg.task).full_chunk
    return [(X[i : i + chunk], y[i : i + chunk]) for i in range(0, len(X), chunk)]


@torch.no_grad()
def accuracy(model, X, y, cfg: DemoConfig) -> float:
    """Share of training examples (of next tokens, for the language model) predicted right."""
    right = total = 0
    for xb, yb in full_batches(X, y, cfg):
        right += int((model(xb).argmax(-1) == yb).sum())
        total += yb.numel()
    return right / total


def train(cfg: DemoConfig, X, y, order, tracker_fn=None, recorder_dir=None, desc="train", seed=None):
    """One run. ``tracker_fn(model, optimizer)`` makes the PathTracker of run 2. Gradients are
    clipped (``cfg.clip_grad_norm``) inside the measured step, so they are measured before clipping."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed if seed is None else seed)
    model = tasks.get_task(cfg.task).model(cfg.sizes).to(cfg.device)
    if cfg.fsdp:
        model = shard_model(model, cfg.device)
    lossf = sharded_loss_fn if cfg.fsdp else loss_fn
    opt = make_optimizer(cfg, model.parameters())
    tracker = tracker_fn(model, opt) if tracker_fn else None
    recorder = SnapshotRecorder(model, recorder_dir, every=cfg.snapshot_every) if recorder_dir and cfg.snapshot_every else None
    losses = {}

    def step_fn():
        if cfg.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
        opt.step()

    for step in tqdm(range(cfg.steps), desc=desc, disable=not cfg.progress, leave=False):
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        if recorder:
            recorder.maybe_save(step, lr)
        idx = order[step].to(cfg.device)
        loss = lossf(model, (X[idx], y[idx]))
        loss.backward()
        shown = _global_loss(loss) if cfg.fsdp else loss.detach()
        losses[step] = float(shown)
        if tracker is not None:
            with tracker.step(step, shown):  # measures g here, before clipping
                step_fn()
        else:
            step_fn()
        opt.zero_grad(set_to_none=True)
    if recorder:
        recorder.maybe_save(cfg.steps, lr_at(cfg.steps, cfg), force=True)
    return model, losses, tracker


def _init_distributed(cfg: DemoConfig) -> tuple[bool, bool]:
    """Join the torchrun job if there is one; returns (whether this rank writes the outputs,
    whether the process group was created here and is to be ended by run_demo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True, False
    import torch.distributed as dist

    cfg.fsdp = True
    if cfg.device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cfg.device = f"cuda:{local}"
        torch.cuda.set_device(local)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    rank = dist.get_rank()
    cfg.progress = cfg.progress and rank == 0
    return rank == 0, owned


def choose_threads(cfg: DemoConfig) -> int:
    """CPU threads for all runs (the same in each: a matmul's rounding can depend on the count).

    With ``threads=None``: torch's default, capped at the cores left free by the machine's
    1-minute load average (at least 1). On a shared machine, OpenMP threads that spin-wait for
    a busy core are several times slower than one thread per process (measured on 2 cores)."""
    if cfg.threads is not None:
        return cfg.threads
    n = torch.get_num_threads()
    load = _load()
    if load is None:
        return n
    return max(1, min(n, int((os.cpu_count() or n) - load)))


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _barrier(cfg: DemoConfig) -> None:
    if cfg.fsdp:
        import torch.distributed as dist

        dist.barrier()


def _backend_used(cfg: DemoConfig) -> str:
    """The backend that cfg.backend resolves to for the model's tensors (not "auto")."""
    from .. import backend_for

    return backend_for(torch.device(cfg.device).type, cfg.backend)


def run_demo(cfg: DemoConfig) -> dict:
    """Run the protocol and write the report to cfg.out. Returns the summary (every rank)."""
    writer_rank, owned_group = _init_distributed(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    load_at_start = _load()
    threads = choose_threads(cfg) if cfg.device == "cpu" else torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    spec = tasks.get_task(cfg.task)
    X, y = spec.data(cfg.sizes, cfg.device)
    order = batch_order(len(X), cfg)
    seconds = {}

    # Run 1: train, keep x* and the losses.
    t = time.perf_counter()
    model1, losses, _ = train(cfg, X, y, order, recorder_dir=os.path.join(cfg.out, "snapshots"), desc="run 1 (find x*)")
    xstar_path = os.path.join(cfg.out, "xstar.safetensors")
    save_snapshot(model1, xstar_path, cfg.steps)  # collective when sharded; rank 0 writes
    if writer_rank:
        with open(os.path.join(cfg.out, "trajectory.json"), "w") as f:
            json.dump({"losses": losses}, f)
    acc = accuracy(model1, X, y, cfg)
    del model1
    seconds["run1"] = time.perf_counter() - t

    # Control: run 1 from another seed gives another end point x*'.
    cross = None
    if cfg.cross_seed:
        t = time.perf_counter()
        s2 = cfg.cross_seed_value
        model_c, losses_c, _ = train(cfg, X, y, batch_order(len(X), cfg, s2), desc=f"run 1' (seed {s2})", seed=s2)
        cross_path = os.path.join(cfg.out, f"xstar_seed{s2}.safetensors")
        save_snapshot(model_c, cross_path, cfg.steps)
        cross = {"name": f"xstar_seed{s2}", "seed": s2, "path": cross_path, "final_train_loss": losses_c[cfg.steps - 1],
                 "final_train_accuracy": accuracy(model_c, X, y, cfg)}
        del model_c
        seconds["run1_cross_seed"] = time.perf_counter() - t
    _barrier(cfg)  # the end points are on disk before run 2 reads its slices

    # Run 2: replay the same path and measure every step.
    t = time.perf_counter()
    probes = probe_set(X, y, cfg)
    writer = report.tensorboard_writer(os.path.join(cfg.out, "tensorboard")) if writer_rank else None

    def make_tracker(model, opt):
        refs = [Reference.from_file(model, xstar_path, name="xstar")]
        if cross:
            refs.append(Reference.from_file(model, cross["path"], name=cross["name"]))
        if cfg.x0_reference:
            refs.append(Reference.from_model(model, name="x0"))
        return PathTracker(
            model,
            refs,
            opt,
            loss_fn=sharded_loss_fn if cfg.fsdp else loss_fn,
            probe_batches=probes,
            probe_every=cfg.probe_every,
            full_batch=full_batches(X, y, cfg) if cfg.full_batch else None,
            weight_decay=cfg.weight_decay or None,
            per_tensor=cfg.per_tensor,
            lags=cfg.lags or None,
            lag_every=cfg.lag_every,
            expected_losses=losses,
            backend=cfg.backend,
            writer=writer,
        )

    model2, _, tracker = train(cfg, X, y, order, tracker_fn=make_tracker, desc="run 2 (measure)")
    replay_ratio = tracker.finish()
    seconds["run2"] = time.perf_counter() - t
    if writer is not None:
        writer.close()
    numel = sum(p.numel() for p in model2.parameters())  # global sizes, also for DTensors
    extra = {
        "task": cfg.task,
        "task_description": spec.describe(cfg.sizes),
        "config": asdict(cfg),
        "final_train_accuracy": acc,
        "final_train_loss": losses[cfg.steps - 1],
        "replay_final_distance_ratio": replay_ratio,
        "final_distance_ratios": dict(tracker.final_distance_ratios),
        "cross_seed": {k: v for k, v in cross.items() if k != "path"} if cross else None,
        "update_mode": tracker.update_mode,
        "how_to_measure": {"full": "DemoConfig(full_batch=False) / --no-full-batch",
                           "lags": "DemoConfig(lags=()) / --lags none, or too few steps for any lag"},
        "optimizer": cfg.optimizer,
        "lr_comparable_to_eta_star": cfg.optimizer in ("sgd", "momentum", "nesterov"),
        "seconds_by_run": seconds,
        "backend_used": _backend_used(cfg),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "threads": threads,
        "load_average_at_start": load_at_start,
        "load_average_at_end": _load(),
        "seconds": time.perf_counter() - t0,
    }
    title = (f"{cfg.task}: {spec.describe(cfg.sizes)}, D={numel:,}; {cfg.optimizer}, lr {cfg.lr:g} {cfg.schedule}"
             + (f", wd {cfg.weight_decay:g}" if cfg.weight_decay else "") + (f", clip {cfg.clip_grad_norm:g}" if cfg.clip_grad_norm else "")
             + f", {cfg.steps} steps")
    if writer_rank:
        summary = report.write_report(cfg.out, tracker.records, tracker.per_tensor_records, numel, title, extra, findings=True)
    else:
        summary = report.summarize(tracker.records, numel)
        summary.update(extra)
    if owned_group:  # ours to end: a process left with gloo's threads running can abort at exit
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return summary
