"""Sync-free check: does measuring every step add host-device synchronisations?

    python bench/gpu_sync_check.py [--steps 5] [--backend auto|cuda|triton] [--out FILE]

Trains a small MLP on CUDA for a few steps with pathgeom_fast.tracker.PathTracker measuring
every step (the minibatch gradient, the update, K probe batches every step) with the whole
loop inside ``torch.cuda.set_sync_debug_mode("error")``, so any synchronising CUDA call
raises. ``tracker.records`` is read only afterwards, outside that mode. Exit status 0 when
no synchronisation happened, 1 when one did (the traceback says where), 2 without a GPU.

The training step itself is written sync-free (no .item(), the loss handed over as a
tensor); warm-up steps run first, outside the mode, so that one-time set-up (Triton
compilation, plan and argument-buffer caches, cuBLAS handles) is not counted.
"""

from __future__ import annotations

import argparse
import sys
import traceback

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--out", default=None, help="also write the verdict to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_sync_check: no CUDA device; nothing checked")
        return 2

    from pathgeom_fast.tracker import PathTracker, Reference

    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator(device=dev).manual_seed(1)

    def batch():
        return torch.randn(32, 64, device=dev, generator=gen), torch.randint(0, 10, (32,), device=dev, generator=gen)

    def loss_fn(m, b):
        x, y = b
        return torch.nn.functional.cross_entropy(m(x), y)

    probes = [batch() for _ in range(args.probes)]
    ref = Reference.from_model(model)  # x* = the start; any fixed point works for this check
    tracker = PathTracker(model, ref, opt, loss_fn=loss_fn, probe_batches=probes, probe_every=1, backend=args.backend)

    def train_step(step):
        b = batch()
        opt.zero_grad(set_to_none=False)
        loss = loss_fn(model, b)
        loss.backward()
        with tracker.step(step, loss.detach()):
            opt.step()

    for s in range(args.warmup):
        train_step(s)
    torch.cuda.synchronize()
    verdict, status = "no synchronisation in %d measured steps (backend=%s)" % (args.steps, args.backend), 0
    try:
        torch.cuda.set_sync_debug_mode("error")
        for s in range(args.warmup, args.warmup + args.steps):
            train_step(s)
    except Exception as exc:  # the synchronising call raises here
        verdict, status = f"SYNC: {type(exc).__name__}: {exc}\n{traceback.format_exc()}", 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    rows = tracker.records  # read outside the mode
    kinds = sorted({r.get("kind") for r in rows})
    text = f"gpu_sync_check: {verdict}\nrecords: {len(rows)} rows, kinds {kinds}"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
