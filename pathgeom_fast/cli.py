"""The ``pathgeom`` command line: demo, analyze, bench."""

from __future__ import annotations

import argparse
import importlib
import os
import sys


def _load_callable(spec: str, what: str):
    mod, sep, name = spec.partition(":")
    if not sep or not mod or not name:
        raise SystemExit(f"pathgeom: {what} must look like 'package.module:function', got {spec!r}")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"pathgeom: cannot load {what} {spec!r}: {exc}") from exc


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _cmd_demo(args) -> int:
    from . import report
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(
        out=args.out, steps=args.steps, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        schedule=args.schedule, weight_decay=args.weight_decay, model=args.model, probe_batches=args.probe_batches,
        probe_every=args.probe_every, full_batch=not args.no_full_batch, per_tensor=args.per_tensor,
        snapshot_every=args.snapshot_every, device=args.device, seed=args.seed, backend=args.backend,
        progress=not args.quiet,
    )
    summary = run_demo(cfg)
    if not _is_rank0():
        return 0
    print(report.format_table(summary))
    print(
        f"final train loss {summary['final_train_loss']:.4f}, accuracy {summary['final_train_accuracy']:.3f}; "
        f"replay ended {summary['replay_final_distance_ratio']:.1e} of the initial distance from x*; "
        f"{summary['seconds']:.1f} s"
    )
    print(f"wrote {os.path.join(args.out, 'records.csv')}, summary.json, geometry.png, snapshots/")
    return 0


def _cmd_analyze(args) -> int:
    import torch

    from . import report
    from .snapshots import analyze_snapshots, list_snapshots

    make_model = _load_callable(args.model, "--model")
    make_data = _load_callable(args.data, "--data")
    if args.loss:
        loss_fn = _load_callable(args.loss, "--loss")
    else:
        import torch.nn.functional as F

        def loss_fn(model, batch):
            x, y = batch
            return F.cross_entropy(model(x), y)

    model = make_model().to(args.device)
    data = make_data()
    if isinstance(data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in data):
        data = torch.utils.data.TensorDataset(*data)
    n = len(data)
    to_dev = lambda b: tuple(t.to(args.device) for t in b)
    gen = torch.Generator().manual_seed(args.seed)
    probes = []
    for _ in range(args.probe_batches):
        idx = torch.randperm(n, generator=gen)[: args.batch_size].tolist()
        probes.append(to_dev(torch.utils.data.default_collate([data[i] for i in idx])))
    full = None
    if not args.no_full_batch:
        loader = torch.utils.data.DataLoader(data, batch_size=args.full_batch_size, shuffle=False)
        full = [to_dev(b) for b in loader]
    records, per_tensor = analyze_snapshots(
        args.snapshots, model, loss_fn, probes, full, reference=args.reference, backend=args.backend,
        per_tensor=args.per_tensor, progress=not args.quiet,
    )
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    extra = {"snapshots": args.snapshots, "reference": args.reference or list_snapshots(args.snapshots)[-1][1]}
    summary = report.write_report(args.out, records, per_tensor, numel, f"analysis of {args.snapshots}", extra)
    print(report.format_table(summary))
    print(f"wrote {os.path.join(args.out, 'records.csv')}, summary.json, geometry.png")
    return 0


def _cmd_bench(args) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def version_text() -> str:
    """Package, torch and Triton versions and what is compiled (for --version and bug reports)."""
    import platform

    import torch

    from . import __version__, _ext

    lines = [f"pathgeom_fast {__version__}", f"torch {torch.__version__} (CUDA {torch.version.cuda or '-'})"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton not installed (backend='triton' unavailable)")
    if _ext.available():
        what = "CPU" + (" + CUDA kernels" if _ext.WITH_CUDA else " kernel only (built without CUDA)")
        lines.append(f"extension: built, {what}; CPU instruction set {_ext._C.cpu_isa()}")
    else:
        lines.append(f"extension: not loaded: {_ext.load_error()}")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible"
    lines.append(f"python {platform.python_version()}, GPU {gpu}")
    return "\n".join(lines)


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    from .demo import MODELS, OPTIMIZERS, SCHEDULES, DemoConfig
    from .ops import BACKENDS

    d = DemoConfig()
    p = argparse.ArgumentParser(
        prog="pathgeom",
        description="Measure the geometry of optimization paths (RSI, EB, cosine, optimal step) with fused kernels.",
    )
    p.add_argument("--version", action=_VersionAction, help="print the versions and the extension status, and exit")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="run the two-run protocol on a small network and scikit-learn's digits (CPU, about a minute)",
        description="Run 1 trains and keeps x*; run 2 replays the same path and measures, every step, the "
        "training gradient and the optimizer's update, and every --probe-every steps K fixed probe minibatches "
        "and the full-batch gradient. Writes records.csv, summary.json, geometry.png, snapshots/ and "
        "xstar.safetensors to --out and prints a summary table. Under `torchrun --nproc-per-node N -m "
        "pathgeom_fast.cli demo` the model is sharded with FSDP2 (gloo on CPU, NCCL with --device cuda).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--out", default=d.out, help="output directory")
    demo.add_argument("--steps", type=int, default=d.steps, help="training steps per run")
    demo.add_argument("--batch-size", type=int, default=d.batch_size)
    demo.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="momentum = SGD with momentum 0.9; adam = AdamW")
    demo.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    demo.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="learning-rate schedule")
    demo.add_argument("--weight-decay", type=float, default=d.weight_decay, help="also measured as g + wd*x when > 0")
    demo.add_argument("--model", choices=MODELS, default=d.model)
    demo.add_argument("--probe-batches", type=int, default=d.probe_batches, help="K fixed probe minibatches")
    demo.add_argument("--probe-every", type=int, default=d.probe_every, help="measure probes every N steps (0: never)")
    demo.add_argument("--no-full-batch", action="store_true", help="skip the full-batch gradient")
    demo.add_argument("--per-tensor", action="store_true", help="also write per_tensor.csv")
    demo.add_argument("--snapshot-every", type=int, default=d.snapshot_every, help="snapshot run 1 every N steps")
    demo.add_argument("--device", default=d.device, help="cpu or cuda")
    demo.add_argument("--seed", type=int, default=d.seed)
    demo.add_argument("--backend", choices=BACKENDS, default=d.backend, help="kernel backend")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)

    an = sub.add_parser(
        "analyze",
        help="measure a directory of step_*.safetensors snapshots against its last (or a given) snapshot",
        description="Loads each snapshot into the model and measures K probe minibatch gradients and the "
        "full-batch gradient against the reference. --model returns an nn.Module (no arguments); --data returns "
        "a Dataset or a tuple of tensors (inputs, targets); --loss(model, batch) returns the loss "
        "(default: cross-entropy of model(inputs) against targets).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    an.add_argument("snapshots", help="directory of step_*.safetensors files")
    an.add_argument("--model", required=True, help="module:function building the model")
    an.add_argument("--data", required=True, help="module:function returning the training data")
    an.add_argument("--loss", default=None, help="module:function(model, batch) -> loss")
    an.add_argument("--reference", default=None, help="x* snapshot (default: the last snapshot)")
    an.add_argument("--out", default="pathgeom-analysis", help="output directory")
    an.add_argument("--probe-batches", type=int, default=8)
    an.add_argument("--batch-size", type=int, default=32, help="probe minibatch size")
    an.add_argument("--full-batch-size", type=int, default=1024, help="batch size for the full-batch gradient")
    an.add_argument("--no-full-batch", action="store_true")
    an.add_argument("--per-tensor", action="store_true")
    an.add_argument("--device", default="cpu")
    an.add_argument("--seed", type=int, default=0, help="seed of the probe minibatch draw")
    an.add_argument("--backend", choices=BACKENDS, default="auto")
    an.add_argument("--quiet", action="store_true")
    an.set_defaults(func=_cmd_analyze)

    from .bench import add_arguments

    be = sub.add_parser(
        "bench",
        help="time the fused op against naive PyTorch and the bandwidth limit on this device",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(be)
    be.set_defaults(func=_cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
