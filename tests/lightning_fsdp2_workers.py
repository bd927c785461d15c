"""Worker functions for tests/integrations/test_integrations_lightning_fsdp2.py: a real lightning.Trainer with
ModelParallelStrategy (FSDP2 ``fully_shard`` or tensor parallel applied in ``configure_model``)
in 2 gloo processes on CPU, launched by dist_workers.launch (the process group exists before the
Trainer, which then uses it as it is).

Each rank saves what the parent test checks to ``<out>/rank<r>.pt``: the logged rows, the full
x_t and pre-clip g_t of every optimizer step (gathered with ``full_tensor()`` in the module's own
``on_before_optimizer_step``, which Lightning calls after the callbacks' and before clipping),
the gradient norm after clipping, the final point, and the warnings."""

from __future__ import annotations

import glob
import os

import torch
import torch.nn.functional as F

GEN = torch.Generator().manual_seed(2)
X, Y = torch.randn(64, 6, generator=GEN) * 3, torch.randint(0, 3, (64,), generator=GEN)
PROBES = [(X[:8], Y[:8]), (X[8:16], Y[8:16]), (X[16:24], Y[16:24])]
CLIP = 0.1
STEPS = 6


def full(t) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective), a plain tensor as it is; fp64 flat."""
    from pathgeom_fast.distributed import is_dtensor

    return (t.full_tensor() if is_dtensor(t) else t).detach().reshape(-1).double()


def make_module(mode: str | None):
    """The LightningModule: mode "fsdp2" (fully_shard per Linear and the root on the data
    parallel mesh), "tp" (column- then row-wise tensor parallel), "mixed" (only the first layer
    tensor parallel: DTensors next to plain parameters), None (single process, nothing applied)."""
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
            self.captured = []  # (x_t, g_t) before clipping, full tensors
            self.clipped_norms = []  # ||g|| the optimizer stepped with

        def configure_model(self):
            if mode == "fsdp2":
                from torch.distributed.fsdp import fully_shard

                mesh = self.device_mesh["data_parallel"]
                fully_shard(self.net[0], mesh=mesh)
                fully_shard(self.net[2], mesh=mesh)
                fully_shard(self.net, mesh=mesh)
            elif mode in ("tp", "mixed"):
                from torch.distributed.tensor import Replicate
                from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

                mesh = self.device_mesh["tensor_parallel"]
                plan = {"0": ColwiseParallel(), "2": RowwiseParallel()} if mode == "tp" else {"0": ColwiseParallel(output_layouts=Replicate())}
                parallelize_module(self.net, mesh, plan)

        def forward(self, x):  # the default probe loss calls module(inputs)
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def on_before_optimizer_step(self, optimizer):  # after the callbacks', before clipping
            ps = list(self.parameters())
            self.captured.append((torch.cat([full(p) for p in ps]), torch.cat([full(p.grad) for p in ps])))

        def after_step(self, optimizer, args, kwargs):  # .grad is the one the step used, clipped
            self.clipped_norms.append(float(torch.cat([full(p.grad) for p in self.parameters()]).norm()))

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            opt.register_step_post_hook(self.after_step)
            return opt

    return Module()


def strategy(mode: str):
    from lightning.pytorch.strategies import ModelParallelStrategy

    dp, tp = (2, 1) if mode == "fsdp2" else (1, 2)
    return ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp)


class EpochPermutation(torch.utils.data.Sampler):
    """The order in which Lightning's DistributedSampler (shuffle=True, seed 0, set_epoch each
    epoch) hands out the samples, all of them in one process: with batches twice the size of
    the 2 data-parallel ranks' batches, each batch holds exactly the samples of the ranks' batches."""

    def __init__(self, n):
        self.n, self.epoch = n, 0

    def __len__(self):
        return self.n

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.epoch)
        self.epoch += 1
        return iter(torch.randperm(self.n, generator=gen).tolist())


def fit(mode, callbacks, batch_size, logger=False, root=None):
    """6 optimizer steps, 2 micro-batches each, clipping at CLIP; sharded when mode is given
    (2 processes), a single process otherwise."""
    import lightning.pytorch as pl

    torch.manual_seed(0)
    module = make_module(mode)
    extra = dict(accelerator="cpu", devices=2, strategy=strategy(mode)) if mode else dict(accelerator="cpu", devices=1)
    trainer = pl.Trainer(
        max_steps=STEPS, accumulate_grad_batches=2, gradient_clip_val=CLIP, logger=logger, callbacks=callbacks,
        enable_checkpointing=root is not None, default_root_dir=root, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=2, **extra,
    )
    # sharded: Lightning's own DistributedSampler over the data-parallel ranks
    sampler = None if mode else EpochPermutation(len(X))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=batch_size, sampler=sampler)
    trainer.fit(module, data)
    return module, trainer


def two_runs(rank, world, out, mode):
    """Run 1 records x* (and Lightning's ModelCheckpoint writes its distributed checkpoint
    folder); run 2 measures every step against both, with probes every 2 steps."""
    import torch.distributed as dist
    from integ_helpers import Warnings

    from pathgeom_fast.checkpoints import load_snapshot
    from pathgeom_fast.integrations.lightning import PathGeometryCallback

    os.environ["LOCAL_RANK"] = str(rank)
    ref = os.path.join(out, "xstar.safetensors")
    with Warnings() as w1:
        module1, _ = fit(mode, [PathGeometryCallback.record_reference(ref)], 8, root=os.path.join(out, "run1"))
    end1 = torch.cat([full(p) for p in module1.parameters()])  # every rank: a collective
    (ckpt,) = glob.glob(os.path.join(out, "run1", "**", "*.ckpt"), recursive=True)
    assert os.path.isfile(os.path.join(ckpt, ".metadata")), ckpt  # a DCP folder
    if rank == 0:
        state, _ = load_snapshot(ref)
        assert torch.equal(torch.cat([state[n].reshape(-1).double() for n, _ in module1.named_parameters()]), end1)
    dist.barrier()

    from integ_helpers import capture_logger

    logger = capture_logger()
    cb = PathGeometryCallback({"xstar": ref, "ckpt": ckpt}, every=1, probe_batches=PROBES, probe_every=2)
    with Warnings() as w2:
        module2, trainer = fit(mode, [cb], 8, logger=logger)
    tracker = cb.measurer.tracker
    assert tracker.sharded and tracker.update_mode == "momentum"
    local = sum(t.to_local().numel() for t in tracker.ref.tensors)
    assert 0 < local < sum(t.numel() for t in tracker.ref.tensors), local  # only this rank's slice of x*
    torch.save(
        {
            "rows": logger.rows,
            "captured": module2.captured,
            "clipped_norms": module2.clipped_norms,
            "final": torch.cat([full(p) for p in module2.parameters()]),
            "end1": end1,
            "names": [n for n, _ in module2.named_parameters()],
            "ckpt": ckpt,
            "ratio": cb.final_distance_ratio,
            "latest": cb.latest,
            "records": [r for r in cb.measurer.records if r["kind"] == "minibatch"],
            "warnings": w1.matching("PathGeometryCallback") + w2.matching("PathGeometryCallback"),
            "global_zero": trainer.is_global_zero,
        },
        os.path.join(out, f"rank{rank}.pt"),
    )


def mixed_refused(rank, world, out):
    """DTensors next to plain parameters: refused in on_fit_start, before any step."""
    import lightning.pytorch as pl

    from pathgeom_fast.integrations.lightning import PathGeometryCallback

    import torch.distributed as dist
    from integ_helpers import perturbed_reference

    os.environ["LOCAL_RANK"] = str(rank)
    ref = os.path.join(out, "xstar.safetensors")
    if rank == 0:
        perturbed_reference(make_module(None), ref)
    dist.barrier()
    torch.manual_seed(0)  # the same parameters on both ranks
    module = make_module("mixed")
    before = [p.detach().clone() for p in module.parameters()]
    trainer = pl.Trainer(
        max_steps=2, logger=False, callbacks=[PathGeometryCallback(ref)], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=2, strategy=strategy("mixed"),
    )
    try:
        trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=8))
    except ValueError as exc:
        msg = str(exc)
    else:
        raise AssertionError("a module mixing DTensor and plain parameters was measured")
    assert "2 of the module's 4 trainable parameters are DTensors (first 'net.0.weight')" in msg, msg
    assert "plain tensors (first 'net.2.weight')" in msg, msg
    after = [full(p) for p in module.parameters()]
    assert all(torch.equal(a, b.reshape(-1).double()) for a, b in zip(after, before))  # no training step ran
