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


def _parse_lags(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none", "off"):
        return ()
    try:
        lags = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lags must be comma-separated positive integers or 'none', got {text!r}") from None
    if any(k < 1 for k in lags):
        raise argparse.ArgumentTypeError(f"--lags must be positive integers, got {text!r}")
    return lags


def _cmd_demo(args) -> int:
    import time

    from . import report
    from .demo import DemoConfig, run_demo

    t0 = time.perf_counter()
    try:
        cfg = DemoConfig(
            out=args.out, task=args.task, model=args.model, steps=args.steps, batch_size=args.batch_size,
            optimizer=args.optimizer, lr=args.lr, schedule=args.schedule, weight_decay=args.weight_decay,
            clip_grad_norm=args.clip_grad_norm, probe_batches=args.probe_batches, probe_every=args.probe_every,
            full_batch=not args.no_full_batch, per_tensor=args.per_tensor, snapshot_every=args.snapshot_every,
            lags=args.lags, lag_every=args.lag_every, cross_seed=args.cross_seed, x0_reference=args.x0_reference,
            width=args.width, depth=args.depth, context=args.context, train_size=args.train_size,
            threads=args.threads, device=args.device, seed=args.seed, backend=args.backend, progress=not args.quiet,
        )
    except ValueError as exc:
        raise SystemExit(f"pathgeom demo: {exc}") from None
    summary = run_demo(cfg)
    if not _is_rank0():
        return 0
    print(report.format_table(summary))
    print(
        f"final train loss {summary['final_train_loss']:.4f}, accuracy {summary['final_train_accuracy']:.3f}; "
        f"replay ended {summary['replay_final_distance_ratio']:.1e} of the initial distance from x*; "
        f"{time.perf_counter() - t0:.1f} s in all ({summary['threads']} CPU thread(s); load average "
        f"{summary['load_average_at_start'] if summary['load_average_at_start'] is not None else 'unknown'} at the start)"
    )
    print(f"wrote {os.path.join(args.out, 'records.csv')}, summary.json, geometry.png, findings.md")
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

    from .tasks import TASK_SPECS, TASKS

    table = "; ".join(
        f"{name}: {t.summary}, {t.defaults.get('steps')} steps, {t.defaults.get('optimizer')} lr {t.defaults.get('lr')}"
        for name, t in TASK_SPECS.items()
    )
    demo = sub.add_parser(
        "demo",
        help="the paper's two-run protocol on a small workload on CPU (--task mlp|cnn|wide-mlp|lm), with findings.md",
        description="Run 1 trains and keeps x*; with --cross-seed a second run 1 from seed+1 gives another end point "
        "x*'; run 2 replays run 1's path and measures, every step, the training gradient (before clipping) and the "
        "optimizer's update, every --probe-every steps K fixed probe minibatches and the full-batch gradient (their "
        "weight-decay variants with --weight-decay), and the lagged orthogonal cosine (--lags), against x* (and x*', and "
        "x_0 with --x0-reference). Writes records.csv, summary.json, geometry.png, findings.md, snapshots/ and "
        "xstar.safetensors to --out and prints a summary table. Options left unset take the task's defaults. "
        f"Tasks: {table}. Under `torchrun --nproc-per-node N -m pathgeom_fast.cli demo` the model is sharded with "
        "FSDP2 (gloo on CPU, NCCL with --device cuda).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    task_default = "the task's"
    demo.add_argument("--task", choices=TASKS, default=None, help="workload (default: mlp)")
    demo.add_argument("--model", choices=MODELS, default=None, help=argparse.SUPPRESS)  # old name of --task
    demo.add_argument("--out", default=d.out, help="output directory")
    demo.add_argument("--steps", type=int, default=None, help=f"training steps per run (default: {task_default})")
    demo.add_argument("--batch-size", type=int, default=None, help="minibatch size (default: the task's)")
    demo.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                      help="momentum/nesterov = SGD with momentum 0.9; adam = adamw = AdamW (decoupled decay); "
                      "adam-l2 = torch.optim.Adam with coupled L2, as the paper (default: the task's)")
    demo.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the task's)")
    demo.add_argument("--schedule", choices=SCHEDULES, default=None, help="learning-rate schedule (default: the task's)")
    demo.add_argument("--weight-decay", type=float, default=None,
                      help="weight decay of the optimizer; when > 0 also measured as g + wd*x (*_wd rows) (default: the task's)")
    demo.add_argument("--clip-grad-norm", type=float, default=None,
                      help="clip the gradient norm (0: off); gradients are measured before clipping (default: the task's)")
    demo.add_argument("--probe-batches", type=int, default=None, help="K fixed probe minibatches (default: the task's)")
    demo.add_argument("--probe-every", type=int, default=None, help="measure probes every N steps, 0: never (default: the task's)")
    demo.add_argument("--no-full-batch", action="store_true", help="skip the full-batch gradient")
    demo.add_argument("--per-tensor", action="store_true", help="also write per_tensor.csv")
    demo.add_argument("--snapshot-every", type=int, default=None, help="snapshot run 1 every N steps, 0: only x* (default: the task's)")
    demo.add_argument("--lags", type=_parse_lags, default=d.lags, metavar="K,K,...",
                      help="lags of the lagged orthogonal cosine, or 'none' (default: the paper's 1,2,5,10,20,50)")
    demo.add_argument("--lag-every", type=int, default=None,
                      help="anchor steps of the lagged cosine; one parameter copy is kept per live anchor (default: the task's)")
    demo.add_argument("--cross-seed", action=argparse.BooleanOptionalAction, default=None,
                      help="control: run 1 again from seed+1 and measure the path against that end point too "
                      "(default: on for mlp and cnn, off for wide-mlp and lm, where it costs a third training run)")
    demo.add_argument("--x0-reference", action=argparse.BooleanOptionalAction, default=None,
                      help="control: measure against x_0, the start of the path, too (default: on, except for wide-mlp "
                      "where it costs a 200 MB copy and two more passes per step)")
    demo.add_argument("--width", type=int, default=None, help="hidden width / channels / d_model (default: the task's)")
    demo.add_argument("--depth", type=int, default=None, help="hidden layers / transformer blocks (default: the task's)")
    demo.add_argument("--context", type=int, default=None, help="lm: tokens per sequence (default: 64)")
    demo.add_argument("--train-size", type=int, default=None,
                      help="training examples (digits: first N of 1797; lm: N windows, default 512)")
    demo.add_argument("--threads", type=int, default=None,
                      help="CPU threads (default: torch's, or 1 when the machine's load average is already at or above its "
                      "core count: spin-waiting OpenMP threads are then several times slower)")
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
