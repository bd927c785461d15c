"""Worker functions for test_integrations_accelerate.py: the plain-loop hook under DDP (gloo, CPU)."""

from __future__ import annotations

import json
import os
import warnings

import torch
import torch.nn.functional as F

STEPS, BATCH = 6, 16


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))


def _data():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(STEPS * BATCH, 6, generator=gen) * 2, torch.randint(0, 3, (STEPS * BATCH,), generator=gen)


def _run(model, geo, rank=0, world=1, lr=0.05):
    """SGD with momentum; rank r takes rows r::world of each global batch (DDP averages the gradients)."""
    X, Y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scalars = []
    for step in range(STEPS):
        xb, yb = X[step * BATCH : (step + 1) * BATCH], Y[step * BATCH : (step + 1) * BATCH]
        loss = F.cross_entropy(model(xb[rank::world]), yb[rank::world])
        loss.backward()
        with geo.step(model, opt, step, loss):
            opt.step()
        opt.zero_grad()
        scalars.append(geo.scalars() if geo.measured else None)
    return scalars, geo.finish()


def ddp_plain_loop(rank, world, tmp):
    """Run 1 and run 2 under DDP with the plain-loop hook; dump what rank `rank` measured."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pathgeom_fast.integrations import StepMeasurer

    ref = os.path.join(tmp, "xstar.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(DDP(_model()), StepMeasurer.recorder(ref), rank, world)  # rank 0 writes x*; every rank's losses kept
        torch.distributed.barrier()
        scalars, ratio = _run(DDP(_model()), StepMeasurer(ref, every=2), rank, world)  # replay: own losses compared
    warned = [str(w.message) for w in caught if "StepMeasurer" in str(w.message)]
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump({"scalars": scalars, "ratio": ratio, "warnings": warned}, f)
