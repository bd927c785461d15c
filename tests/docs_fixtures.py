"""Placeholders the docs' commands name, made in a page's working directory (see test_docs.py):
runs written by the real libraries (a Hugging Face Trainer's output_dir, a Lightning
checkpoint folder), torch.save checkpoints, and the user modules mymodels.py / mydata.py."""

from __future__ import annotations

import os
import shutil

import torch

import checkpoint_runs as R

MYMODELS = '''
import torch


def net():
    """The network of the Lightning run and of ckpts/ (BatchNorm and Dropout included)."""
    torch.manual_seed(7)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3)
    )
'''

MYDATA = R.HF_DATA_SOURCE + '''

def pairs():
    """(inputs, targets) of the Lightning run and of ckpts/."""
    gen = torch.Generator().manual_seed(2)
    return torch.randn(64, 6, generator=gen) * 3, torch.randint(0, 3, (64,), generator=gen)
'''


def _train_and_save(folder: str, seed: int, steps: int, every: int) -> None:
    os.makedirs(folder, exist_ok=True)
    net = R.lightning_net()
    with torch.no_grad():  # another seed: another starting point
        gen = torch.Generator().manual_seed(seed)
        for p in net.parameters():
            p.add_(0.2 * seed * torch.randn(p.shape, generator=gen))
    x, y = R.lightning_data()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps + 1):
        if step % every == 0:
            torch.save({"model": net.state_dict(), "step": step}, os.path.join(folder, f"step_{step}.pt"))
        if step == steps:
            break
        torch.nn.functional.cross_entropy(net(x[step * 8 % 64 :][:8]), y[step * 8 % 64 :][:8]).backward()
        opt.step()
        opt.zero_grad()


def analyze(cwd: str) -> None:
    with open(os.path.join(cwd, "mymodels.py"), "w") as f:
        f.write(MYMODELS)
    with open(os.path.join(cwd, "mydata.py"), "w") as f:
        f.write(MYDATA)
    shutil.copytree(R.hf_trainer_run().out, os.path.join(cwd, "hf_out"))
    shutil.copytree(R.lightning_run().out, os.path.join(cwd, "lightning_logs", "version_0", "checkpoints"))
    _train_and_save(os.path.join(cwd, "ckpts"), 0, 6, 2)
    _train_and_save(os.path.join(cwd, "other_run"), 1, 6, 6)
    os.rename(os.path.join(cwd, "other_run", "step_6.pt"), os.path.join(cwd, "other_run", "final.pt"))
