"""Measure the geometry in a custom Hugging Face Accelerate loop (python examples/accelerate_loop.py).

The loop uses accelerator.backward, gradient accumulation and accelerator.clip_grad_norm_;
the gradient is measured once per optimizer step, on the last micro-batch, **before** clipping.
The same loop runs twice: run 1 records x* (StepMeasurer.recorder), run 2 measures against it.
Under `accelerate launch` (DDP) every rank measures the same numbers (the gradients are
all-reduced before the hook) and rank 0 writes the files. With fp16 mixed precision call
accelerator.unscale_gradients() before geo.before_step (gradients are still scaled there).
"""

import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from pathgeom_fast.demo import make_data
from pathgeom_fast.integrations import StepMeasurer

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 60
ACCUMULATE = 2
X, Y = make_data()


def train(geo):
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, Y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    step, step_loss = 0, 0.0
    while step < steps:
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(x), y)
                accelerator.backward(loss)
                step_loss = step_loss + loss.detach() / ACCUMULATE  # the step's loss: mean over micro-batches
                if accelerator.sync_gradients:  # the last micro-batch: the optimizer steps now
                    geo.before_step(model, optimizer, step, step_loss)  # measured before clipping
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                if accelerator.sync_gradients:
                    geo.after_step()  # the update just taken
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                if geo.measured and step % 20 == 0:
                    print(step, {k: round(v, 4) for k, v in geo.scalars().items()})
                step, step_loss = step + 1, 0.0
                if step == steps:
                    break
    return geo.finish()


xstar = os.path.join(tempfile.mkdtemp(), "xstar.safetensors")
train(StepMeasurer.recorder(xstar))  # run 1: x* and its loss trajectory
ratio = train(StepMeasurer(xstar, every=1, grad_clipping=True))  # run 2
print("final distance ratio ||x_T - x*|| / ||x_0 - x*|| =", ratio)
