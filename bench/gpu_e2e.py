"""End to end: what measuring costs a real training step.

    python bench/gpu_e2e.py [--device cuda] [--steps 40] [--size gpt2|tiny] [--out FILE.json]

A GPT-2-124M-shaped decoder (12 layers, width 768, 12 heads, vocabulary 50257, context 1024,
random initialisation; built from torch.nn so that it needs no other library), trained with
AdamW under bf16 autocast on synthetic tokens (batch 8 x 512), three ways in one process:
without measuring, with :class:`pathgeom_fast.integrations.StepMeasurer` measuring every 10 steps, and
measuring every step (the pre-clip gradient and the update against a reference point x*,
here a second random initialisation: the cost does not depend on which point it is). The
three are timed in alternating blocks of steps on the same model so that clock and
temperature drift fall on all alike. Prints the median step time of each and the overheads
(targets: every step <= 3%, every 10 steps <= 1%); ``--out`` writes them as JSON.

``--size tiny`` (2 layers, width 64) runs in seconds on a CPU: the tests run it that way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pathgeom_fast.integrations import StepMeasurer  # noqa: E402
from pathgeom_fast.checkpoints import Reference  # noqa: E402

SIZES = {
    "gpt2": dict(layers=12, width=768, heads=12, vocab=50257, context=1024, batch=8, seq=512),
    "tiny": dict(layers=2, width=64, heads=4, vocab=512, context=64, batch=4, seq=32),
}


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """GPT-2's shape: token and position embeddings, pre-norm blocks, a tied output layer."""

    def __init__(self, layers: int, width: int, heads: int, vocab: int, context: int, **_):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx):
        T = idx.shape[1]
        mask = torch.triu(torch.full((T, T), float("-inf"), device=idx.device), 1)
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for b in self.blocks:
            x = b(x, mask)
        return self.head(self.ln(x))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default="gpt2")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per mode (after 5 warm-up steps each)")
    ap.add_argument("--block", type=int, default=10, help="steps per alternating block")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    args = ap.parse_args(argv)
    cfg = SIZES[args.size]
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(**cfg).to(dev)
    xstar = GPT(**cfg).to(dev)  # another random point: the cost does not depend on it
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    numel = sum(p.numel() for p in model.parameters())
    tensors = sum(1 for _ in model.parameters())
    gen = torch.Generator(device="cpu").manual_seed(1)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16)

    def batch():
        t = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"] + 1), generator=gen)
        return t[:, :-1].to(dev, non_blocking=True), t[:, 1:].to(dev, non_blocking=True)

    def train_step(geo, step):
        x, y = batch()
        with amp:
            loss = nn.functional.cross_entropy(model(x).float().view(-1, cfg["vocab"]), y.reshape(-1))
        loss.backward()
        if geo is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        else:
            with geo.step(model, opt, step, loss):
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
        opt.zero_grad(set_to_none=True)

    ref = Reference.from_state_dict(model, xstar.state_dict())
    geos = {
        "none": None,
        "every_10": StepMeasurer(ref, every=10, model=model, grad_clipping=True, expected_losses=None, final_rtol=None),
        "every_1": StepMeasurer(ref, every=1, model=model, grad_clipping=True, expected_losses=None, final_rtol=None),
    }
    times = {k: [] for k in geos}
    step = {k: 0 for k in geos}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for k, geo in geos.items():  # warm-up
        for _ in range(5):
            train_step(geo, step[k])
            step[k] += 1
    sync()
    rounds = math.ceil(args.steps / args.block)
    for _ in range(rounds):
        for k, geo in geos.items():
            for _ in range(args.block):
                t0 = time.perf_counter()
                train_step(geo, step[k])
                sync()
                times[k].append(time.perf_counter() - t0)
                step[k] += 1
    measured = {k: len(g.records) for k, g in geos.items() if g is not None}
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "size": args.size,
        "parameters": numel,
        "tensors": tensors,
        "steps_per_mode": len(times["none"]),
        "median_step_ms": {k: v * 1e3 for k, v in med.items()},
        "overhead": {k: med[k] / med["none"] - 1 for k in ("every_10", "every_1")},
        "rows_recorded": measured,
    }
    print(f"{out['device']}, torch {out['torch']}: {args.size} ({numel / 1e6:.1f}M parameters in {tensors} tensors), "
          f"{out['steps_per_mode']} steps per mode")
    for k in geos:
        extra = "" if k == "none" else f"  ({out['overhead'][k] * 100:+.2f}%)"
        print(f"  {k:<9} {med[k] * 1e3:9.2f} ms per step{extra}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
