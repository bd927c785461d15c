"""Measure the geometry inside a plain PyTorch loop (run as written: python examples/plain_loop.py).

Run 1 trains and saves x*; run 2 retraces the same path with a StepMeasurer.
"""

import os
import sys
import tempfile

import torch
import torch.nn.functional as F

from pathgeom_fast.demo import make_data
from pathgeom_fast.integrations import StepMeasurer
from pathgeom_fast.snapshots import save_snapshot

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 100
X, Y = make_data()


def train(geo=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(steps):
        i = (step * 32) % (len(X) - 32)
        loss = F.cross_entropy(model(X[i : i + 32]), Y[i : i + 32])
        loss.backward()
        if geo is None:
            optimizer.step()
        else:
            with geo.step(model, optimizer, step, loss):  # gradient before the step, update after
                optimizer.step()
            if step % 20 == 0:
                print(step, {k: round(v, 4) for k, v in geo.scalars().items()})
        optimizer.zero_grad()
    return model


xstar = os.path.join(tempfile.mkdtemp(), "xstar.safetensors")
save_snapshot(train(), xstar, steps)  # run 1: x*
train(StepMeasurer(reference=xstar, every=1))  # run 2: measured
