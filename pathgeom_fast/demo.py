"""The main job: the two-run protocol on a small network and a real dataset, on CPU.

Data: scikit-learn's handwritten digits (1797 images of 8x8, shipped inside scikit-learn;
nothing is downloaded). Run 1 trains from a seed and saves x* (and snapshots); run 2 replays
the identical path with a :class:`PathTracker` measuring every step, and writes the report.

``make_model``, ``make_data`` and ``loss_fn`` follow the contract of ``pathgeom analyze``,
so ``pathgeom analyze DIR/snapshots --model pathgeom_fast.demo:make_model
--data pathgeom_fast.demo:make_data`` re-analyses the demo's snapshots.

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

from . import report
from .snapshots import SnapshotRecorder, save_snapshot
from .tracker import PathTracker, Reference

OPTIMIZERS = ("sgd", "momentum", "adam")
SCHEDULES = ("constant", "cosine", "step", "warmup-cosine")
MODELS = ("mlp", "cnn")


@dataclass
class DemoConfig:
    out: str = "pathgeom-demo"
    steps: int = 400
    batch_size: int = 32
    optimizer: str = "momentum"
    lr: float = 0.05
    schedule: str = "cosine"
    weight_decay: float = 0.0
    model: str = "mlp"
    probe_batches: int = 8
    probe_every: int = 10
    full_batch: bool = True
    per_tensor: bool = False
    snapshot_every: int = 50
    device: str = "cpu"
    seed: int = 0
    backend: str = "auto"
    progress: bool = True
    fsdp: bool = False  # set when launched with torchrun (WORLD_SIZE > 1)


def make_data(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as (X float32 [1797, 64] standardised, y int64 [1797])."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32)
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    return X.to(device), torch.tensor(y, dtype=torch.int64, device=device)


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = x.view(-1, 1, 8, 8)
        x = F.relu(self.conv1(x))
        x = F.avg_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def make_model(kind: str = "mlp") -> torch.nn.Module:
    if kind == "mlp":
        return torch.nn.Sequential(
            torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
        )
    if kind == "cnn":
        return SmallCNN()
    raise ValueError(f"model must be one of {MODELS}, got {kind!r}")


def loss_fn(model: torch.nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def sharded_loss_fn(model: torch.nn.Module, batch) -> torch.Tensor:
    """Data-parallel loss: this rank's slice of the batch, scaled so that FSDP2's average of
    the per-rank gradients is the gradient of the mean loss over the whole batch."""
    import torch.distributed as dist

    x, y = batch
    rank, world = dist.get_rank(), dist.get_world_size()
    return F.cross_entropy(model(x[rank::world]), y[rank::world], reduction="sum") * (world / len(x))


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
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "momentum":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}")


def batch_order(n: int, cfg: DemoConfig) -> list[torch.Tensor]:
    """The data order: seeded epochs of random permutations, identical in both runs."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
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


def train(cfg: DemoConfig, X, y, order, tracker_fn=None, recorder_dir=None, desc="train"):
    """One run. ``tracker_fn(model, optimizer)`` makes the PathTracker of run 2."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    model = make_model(cfg.model).to(cfg.device)
    if cfg.fsdp:
        model = shard_model(model, cfg.device)
    lossf = sharded_loss_fn if cfg.fsdp else loss_fn
    opt = make_optimizer(cfg, model.parameters())
    tracker = tracker_fn(model, opt) if tracker_fn else None
    recorder = SnapshotRecorder(model, recorder_dir, every=cfg.snapshot_every) if recorder_dir else None
    losses = {}
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
            with tracker.step(step, shown):
                opt.step()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    if recorder:
        recorder.maybe_save(cfg.steps, lr_at(cfg.steps, cfg), force=True)
    return model, losses, tracker


def _init_distributed(cfg: DemoConfig) -> bool:
    """Join the torchrun job if there is one; returns whether this rank writes the outputs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    import torch.distributed as dist

    cfg.fsdp = True
    if cfg.device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cfg.device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    rank = dist.get_rank()
    cfg.progress = cfg.progress and rank == 0
    return rank == 0


def run_demo(cfg: DemoConfig) -> dict:
    """Run both passes and write the report to cfg.out. Returns the summary (every rank)."""
    writer_rank = _init_distributed(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    X, y = make_data(cfg.device)
    order = batch_order(len(X), cfg)

    # Run 1: train, keep x* and the losses.
    model1, losses, _ = train(cfg, X, y, order, recorder_dir=os.path.join(cfg.out, "snapshots"), desc="run 1 (find x*)")
    xstar_path = os.path.join(cfg.out, "xstar.safetensors")
    save_snapshot(model1, xstar_path, cfg.steps)  # collective when sharded; rank 0 writes
    if writer_rank:
        with open(os.path.join(cfg.out, "trajectory.json"), "w") as f:
            json.dump({"losses": losses}, f)
    if cfg.fsdp:
        import torch.distributed as dist

        dist.barrier()  # x* is on disk before run 2 reads its slices
    with torch.no_grad():
        acc = float((model1(X).argmax(1) == y).float().mean())

    # Run 2: replay the same path and measure every step.
    probes = probe_set(X, y, cfg)
    writer = report.tensorboard_writer(os.path.join(cfg.out, "tensorboard")) if writer_rank else None

    def make_tracker(model, opt):
        return PathTracker(
            model,
            Reference.from_file(model, xstar_path),
            opt,
            loss_fn=sharded_loss_fn if cfg.fsdp else loss_fn,
            probe_batches=probes,
            probe_every=cfg.probe_every,
            full_batch=[(X, y)] if cfg.full_batch else None,
            weight_decay=cfg.weight_decay or None,
            per_tensor=cfg.per_tensor,
            expected_losses=losses,
            backend=cfg.backend,
            writer=writer,
        )

    model2, _, tracker = train(cfg, X, y, order, tracker_fn=make_tracker, desc="run 2 (measure)")
    replay_ratio = tracker.finish()
    if writer is not None:
        writer.close()
    numel = sum(p.numel() for p in model2.parameters())  # global sizes, also for DTensors
    extra = {
        "config": asdict(cfg),
        "final_train_accuracy": acc,
        "final_train_loss": losses[cfg.steps - 1],
        "replay_final_distance_ratio": replay_ratio,
        "update_mode": tracker.update_mode,
        "seconds": time.perf_counter() - t0,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    title = f"digits {cfg.model}, {cfg.optimizer}, lr {cfg.lr} {cfg.schedule}, {cfg.steps} steps"
    if writer_rank:
        return report.write_report(cfg.out, tracker.records, tracker.per_tensor_records, numel, title, extra)
    summary = report.summarize(tracker.records, numel)
    summary.update(extra)
    return summary
