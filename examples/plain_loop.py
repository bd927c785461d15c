"""Measure the geometry inside a plain PyTorch loop (run as written: python examples/plain_loop.py).

The same loop runs twice: run 1 with a recorder (writes x* and its loss trajectory at
geo.finish()), run 2 with a measurer against that x* (warns if it does not retrace run 1).
"""

import os
import sys
import tempfile

import torch
import torch.nn.functional as F

from pathgeom_fast.demo import make_data
from pathgeom_fast.integrations import StepMeasurer

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 100
X, Y = make_data()
probes = [(X[i : i + 32], Y[i : i + 32]) for i in (0, 500, 1000)]  # K = 3 fixed probe batches


def train(geo):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(steps):
        i = (step * 32) % (len(X) - 32)
        loss = F.cross_entropy(model(X[i : i + 32]), Y[i : i + 32])
        loss.backward()
        with geo.step(model, optimizer, step, loss):  # gradient before the step, update after
            optimizer.step()
        optimizer.zero_grad()
        if geo.measured and step % 20 == 0:
            print(step, {k: round(v, 4) for k, v in geo.scalars().items()})
    return geo.finish()


xstar = os.path.join(tempfile.mkdtemp(), "xstar.safetensors")
train(StepMeasurer.recorder(xstar))  # run 1: writes x* and xstar.trajectory.json
ratio = train(StepMeasurer(xstar, every=1, probe_batches=probes, probe_every=10, full_batch=[(X, Y)]))  # run 2
print("final distance ratio ||x_T - x*|| / ||x_0 - x*|| =", ratio)
