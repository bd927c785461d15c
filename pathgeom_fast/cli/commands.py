"""The ``pathgeom`` command line: demo, analyze, bench, compare, sweep."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys


class UsageError(Exception):
    """A mistake the user can fix (a bad option, file or module:function): printed as one line,
    exit status 2; ``--debug`` shows the traceback."""


def _load_callable(spec: str, what: str):
    """The function named by ``module:function``; the current directory is importable."""
    mod, sep, name = spec.partition(":")
    if not sep or not mod or not name:
        raise UsageError(f"{what} must look like 'package.module:function', got {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:  # console scripts do not put it there
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(mod)
    except ModuleNotFoundError as exc:
        if exc.name and (mod == exc.name or mod.startswith(exc.name + ".")):
            raise UsageError(
                f"cannot load {what} {spec!r}: no module named {exc.name!r} (in the current directory {cwd} "
                "or the installed packages)"
            ) from exc
        raise UsageError(f"cannot load {what} {spec!r}: importing {mod} failed: {exc}") from exc
    except Exception as exc:
        raise UsageError(f"cannot load {what} {spec!r}: importing {mod} raised {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, name, None)
    if fn is None:
        raise UsageError(f"cannot load {what} {spec!r}: module {mod} has no attribute {name!r}")
    if not callable(fn):
        raise UsageError(f"{what} {spec!r} is a {type(fn).__name__}, not a function")
    return fn


def _call_user(fn, spec: str, what: str, *args):
    """Call a user's function; its failure becomes one line naming the option."""
    try:
        return fn(*args)
    except Exception as exc:
        raise UsageError(f"{what} {spec!r} raised {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}") from exc


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _finite_float(minimum: float, strict: bool):
    """argparse type: a finite float above ``minimum`` (``strict``) or at least ``minimum``."""
    bound = f"above {minimum:g}" if strict else f">= {minimum:g}"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}") from None
        if not (math.isfinite(v) and (v > minimum if strict else v >= minimum)):
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        return v

    return parse


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where the help already says it (``default:``, ``(default)``), where
    there is none (None: task- or device-dependent defaults the help describes) and for flags
    (a store_true/false switch's default is its help's business: ``--eval (default)`` must not
    read "default: False")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or "default:" in text or "(default)" in text or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


_DemoHelpFormatter = _DefaultsHelpFormatter


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

    from ..report import summary as report
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
            batchnorm=args.batchnorm, skip=args.skip, init_scale=args.init_scale,
            threads=args.threads, device=args.device, seed=args.seed, backend=args.backend, progress=not args.quiet,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    summary = run_demo(cfg)
    if not _is_rank0():
        return 0
    print(report.format_table(summary))
    print(backend_note(cfg.device, cfg.backend))
    ratio = summary["replay_final_distance_ratio"]
    replay = (f"replay ended {ratio:.1e} of the initial distance from x*" if math.isfinite(float(ratio))
              else f"replay distance ratio {ratio}: not a replay (the run went non-finite)")
    print(
        f"final train loss {summary['final_train_loss']:.4f}, accuracy {summary['final_train_accuracy']:.3f}; "
        f"{replay}; "
        f"{time.perf_counter() - t0:.1f} s in all ({summary['threads']} CPU thread(s); load average "
        + (f"{summary['load_average_at_start']:.2f}" if summary["load_average_at_start"] is not None else "unknown")
        + " at the start)"
    )
    print(f"wrote {os.path.join(args.out, 'records.csv')}, summary.json, geometry.png, findings.md")
    return 0


def _analyze_device(requested: str) -> tuple[bool, str]:
    """(distributed, device): join the torchrun job if there is one (gloo on CPU, NCCL on GPUs)."""
    import torch

    device = requested if requested != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False, device
    import torch.distributed as dist

    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return True, device


def _cmd_analyze(args) -> int:
    import torch

    from ..report import summary as report
    from .analyze import analyze, batches_from_data, model_from_hf_config, shard_model
    from ..checkpoints.core import open_run

    distributed, device = _analyze_device(args.device)
    rank0 = _is_rank0()
    run = open_run(args.run)
    if args.model:
        model = _call_user(_load_callable(args.model, "--model"), args.model, "--model")
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"--model {args.model!r} returned a {type(model).__name__}, not a torch.nn.Module")
    elif run.config_dir:
        model = model_from_hf_config(run.config_dir)
    else:
        raise UsageError(
            f"--model module:function is needed: the {run.format} checkpoints in {args.run} do not describe their model "
            "(only Hugging Face checkpoints carry a config.json)"
        )
    model = model.to(device)
    if distributed:
        shard_model(model, device)
    data = _call_user(_load_callable(args.data, "--data"), args.data, "--data")
    probes, full = batches_from_data(
        data, batch_size=args.batch_size, probe_batches=args.probe_batches, full_batch_size=args.full_batch_size,
        full=not args.no_full_batch, seed=args.seed, batched=args.batched,
    )
    loss_fn = _load_callable(args.loss, "--loss") if args.loss else None
    res = analyze(
        run, model, probes, full, loss_fn=loss_fn, references=args.reference or ["last"], per_tensor=args.per_tensor,
        backend=args.backend, train_mode=args.train_mode, seed=args.seed, key_prefix=args.key_prefix,
        progress=not args.quiet and rank0,
    )
    if distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()  # the rows are the same on every rank: rank 0 writes them
    if not rank0:
        return 0
    extra = {
        "run": args.run,
        "format": run.format,
        "checkpoints": [{"step": c.step, "lr": c.lr, "path": c.path} for c in run.checkpoints],
        "references": res.references,
        "skipped": res.skipped,
        "notes": res.notes,
        "mode": "train" if args.train_mode else "eval",
        "probe_batches": len(probes),
        "batch_size": args.batch_size,
        "full_batches": len(full) if full else 0,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "backend": args.backend,
        "backend_used": _backend_used(device, args.backend),
    }
    summary = report.write_report(args.out, res.records, res.per_tensor_records, res.numel, f"analysis of {args.run}", extra)
    written = ["records.csv", "summary.json", "geometry.png"]
    if args.per_tensor:
        from ..report.heatmap import plot_heatmap

        written.append("per_tensor.csv")
        for i, name in enumerate(res.references):
            if not any(r["reference"] == name for r in res.per_tensor_records):
                continue
            fname = f"per_tensor_{args.heatmap}.png" if i == 0 else f"per_tensor_{args.heatmap}_{name}.png"
            plot_heatmap(res.per_tensor_records, os.path.join(args.out, fname), metric=args.heatmap, reference=name)
            written.append(fname)
    print(report.format_table(summary))
    print(backend_note(device, args.backend))
    for note in res.notes:
        print(f"note: {note}")
    if res.skipped:
        pairs = ", ".join(f"step {s['step']} vs {s['reference']!r}" for s in res.skipped[:6])
        print(f"not measured (a checkpoint against itself): {pairs}{' ...' if len(res.skipped) > 6 else ''}")
    print(f"wrote {os.path.join(args.out, written[0])}, {', '.join(written[1:])}")
    return 0


def _cmd_compare(args) -> int:
    from ..report.compare import CompareError, _g, compare_runs

    try:
        result = compare_runs(args.runs, args.out, labels=args.labels)
    except CompareError as exc:
        raise UsageError(str(exc)) from exc
    for r in result["runs"]:
        print(f"{r['label']}: D={r['numel'] or 0:,}, mu {_g(r['mu'])}, L {_g(r['L'])}, eta_opt = mu/L^2 {_g(r['eta_opt'])}, "
              f"final loss {_g(r['final_train_loss'], 4)}")
    print(f"wrote {os.path.join(args.out, 'compare.json')}, compare.md, compare.png")
    return 0


def _cmd_sweep(args) -> int:
    import time

    from .sweep import SWEEPABLE, run_sweep

    given = {k: getattr(args, k) for k in SWEEPABLE if getattr(args, k) is not None}
    swept = [k for k, v in given.items() if len(v) > 1]
    if len(swept) != 1:
        flags = ", ".join("--" + k.replace("_", "-") for k in swept)
        raise UsageError("give exactly one setting several values (e.g. --lr 0.01 0.1), got "
                         + (f"several: {flags}" if swept else "none"))
    setting = swept[0]
    base = {k: v[0] for k, v in given.items() if k != setting}
    base.update(out=args.out, task=args.task, batchnorm=args.batchnorm, skip=args.skip, probe_batches=args.probe_batches,
                probe_every=args.probe_every, lags=args.lags, lag_every=args.lag_every, snapshot_every=args.snapshot_every,
                cross_seed=args.cross_seed, x0_reference=args.x0_reference, full_batch=not args.no_full_batch,
                context=args.context, threads=args.threads, device=args.device, backend=args.backend)
    t0 = time.perf_counter()
    try:
        result = run_sweep(base, setting, given[setting], progress=not args.quiet)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    print(result["line"])
    print(f"{len(result['runs'])} runs in {time.perf_counter() - t0:.1f} s; wrote {os.path.join(args.out, 'compare.json')}, "
          f"compare.md, compare.png and one folder per run")
    return 0


def _cmd_bench(args) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def version_text() -> str:
    """Package, torch and Triton versions and what is compiled (for --version and bug reports)."""
    import platform

    import torch

    from .. import __version__
    from ..ops import extension as _ext

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
    lines += backend_lines()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible"
    lines.append(f"python {platform.python_version()}, GPU {gpu}")
    return "\n".join(lines)


def backend_lines() -> list[str]:
    """Which backends can run here, and what backend='auto' runs on CPU and CUDA tensors."""
    from .. import backend_for
    from ..ops import extension as _ext
    from ..ops import triton_stats as triton_kernels

    compiled = "compiled" if _ext.available() else "not available (extension not loaded)"
    cuda = compiled if not _ext.available() or _ext.WITH_CUDA else "not available (built without CUDA)"
    triton = "available" if triton_kernels.available() else "not available (no usable triton)"
    auto_cpu, auto_cuda = backend_for("cpu"), backend_for("cuda")
    lines = [
        f"backends: cpu {compiled}; cuda {cuda}; triton {triton}; torch available (pure PyTorch)",
        f"backend='auto' runs: {auto_cpu} on CPU tensors, {auto_cuda} on CUDA tensors",
    ]
    if auto_cpu == "torch":
        lines.append(f"fallback: CPU tensors run the torch backend, {_ext.FALLBACK_COST} than the compiled kernel "
                     "(see docs/backends.md)")
    return lines


def _backend_used(device: str, backend: str) -> str:
    """What ``backend`` resolves to for tensors on ``device`` ("cpu", "cuda:1", ...)."""
    import torch

    from .. import backend_for

    return backend_for(torch.device(device).type, backend)


def backend_note(device: str, backend: str) -> str:
    """'backend: cpu (compiled C++ kernel)' and the like, for the commands' output."""
    from ..ops import extension as _ext

    used = _backend_used(device, backend)
    what = {"cpu": "compiled C++ kernel", "cuda": "compiled CUDA kernel", "triton": "Triton kernel"}.get(
        used, "pure-torch fallback" if not _ext.available() else "pure-torch backend")
    note = f"backend: {used} ({what})"
    if used == "torch" and not _ext.available():
        note += f": compiled extension not loaded, {_ext.FALLBACK_COST} than the compiled kernel (see docs/backends.md)"
    return note


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    from .demo import MODELS, OPTIMIZERS, SCHEDULES, DemoConfig
    from ..ops.wrappers import BACKENDS

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
        help="the paper's two-run protocol on a small workload on CPU (--task mlp|cnn|resnet|wide-mlp|lm), with findings.md",
        description="Run 1 trains and keeps x*; with --cross-seed a second run 1 from seed+1 gives another end point "
        "x*'; run 2 replays run 1's path and measures, every step, the training gradient (before clipping) and the "
        "optimizer's update, every --probe-every steps K fixed probe minibatches and the full-batch gradient (their "
        "weight-decay variants with --weight-decay), and the lagged orthogonal cosine (--lags), against x* (and x*', and "
        "x_0 with --x0-reference). Writes records.csv, summary.json, geometry.png, findings.md, snapshots/ and "
        "xstar.safetensors to --out and prints a summary table. Options left unset take the task's defaults. "
        f"Tasks: {table}. Under `torchrun --nproc-per-node N -m pathgeom_fast.cli demo` the model is sharded with "
        "FSDP2 (gloo on CPU, NCCL with --device cuda).",
        formatter_class=_DemoHelpFormatter,
    )
    task_default = "the task's"
    demo.add_argument("--task", choices=TASKS, default=None, help="workload (default: mlp)")
    demo.add_argument("--model", choices=MODELS, default=None, help=argparse.SUPPRESS)  # old name of --task
    demo.add_argument("--out", default=d.out, help="output directory")
    demo.add_argument("--steps", type=_positive_int, default=None, help=f"training steps per run (default: {task_default})")
    demo.add_argument("--batch-size", type=_positive_int, default=None, help="minibatch size (default: the task's)")
    demo.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                      help="momentum/nesterov = SGD with momentum 0.9; adam = adamw = AdamW (decoupled decay); "
                      "adam-l2 = torch.optim.Adam with coupled L2, as the paper (default: the task's)")
    demo.add_argument("--lr", type=_finite_float(0, strict=True), default=None, help="peak learning rate (default: the task's)")
    demo.add_argument("--schedule", choices=SCHEDULES, default=None, help="learning-rate schedule (default: the task's)")
    demo.add_argument("--weight-decay", type=_finite_float(0, strict=False), default=None,
                      help="weight decay of the optimizer; when > 0 also measured as g + wd*x (*_wd rows) (default: the task's)")
    demo.add_argument("--clip-grad-norm", type=_finite_float(0, strict=False), default=None,
                      help="clip the gradient norm (0: off); gradients are measured before clipping (default: the task's)")
    demo.add_argument("--probe-batches", type=int, default=None, help="K fixed probe minibatches (default: the task's)")
    demo.add_argument("--probe-every", type=int, default=None, help="measure probes every N steps, 0: never (default: the task's)")
    demo.add_argument("--no-full-batch", action="store_true", help="skip the full-batch gradient (default: measured)")
    demo.add_argument("--per-tensor", action="store_true", help="also write per_tensor.csv (default: not written)")
    demo.add_argument("--snapshot-every", type=int, default=None, help="snapshot run 1 every N steps, 0: only x* (default: the task's)")
    demo.add_argument("--lags", type=_parse_lags, default=d.lags, metavar="K,K,...",
                      help="lags of the lagged orthogonal cosine, or 'none' (default: the paper's 1,2,5,10,20,50)")
    demo.add_argument("--lag-every", type=_positive_int, default=None,
                      help="anchor steps of the lagged cosine; one parameter copy is kept per live anchor (default: the task's)")
    demo.add_argument("--cross-seed", action=argparse.BooleanOptionalAction, default=None,
                      help="control: run 1 again from seed+1 and measure the path against that end point too "
                      "(default: on, except for wide-mlp, where it costs a third training run of the 50M model)")
    demo.add_argument("--x0-reference", action=argparse.BooleanOptionalAction, default=None,
                      help="control: measure against x_0, the start of the path, too (default: on, except for wide-mlp "
                      "where it costs a 200 MB copy and two more passes per step)")
    demo.add_argument("--width", type=_positive_int, default=None, help="hidden width / channels / d_model (default: the task's)")
    demo.add_argument("--depth", type=_positive_int, default=None, help="hidden layers / transformer blocks (default: the task's)")
    demo.add_argument("--context", type=_positive_int, default=None, help="lm: tokens per sequence (default: 64)")
    demo.add_argument("--train-size", type=_positive_int, default=None,
                      help="training examples: digits, the first N of 1797 (default: all); lm, N windows (default: 512)")
    demo.add_argument("--no-batchnorm", dest="batchnorm", action="store_false",
                      help="ablation: drop the BatchNorm layers (cnn, resnet; nothing else changes)")
    demo.add_argument("--no-skip", dest="skip", action="store_false", help="ablation: drop the residual connections (resnet)")
    demo.add_argument("--init-scale", type=_finite_float(0, strict=True), default=1.0, metavar="S",
                      help="ablation: every parameter of the default initialisation times S")
    demo.add_argument("--threads", type=_positive_int, default=None,
                      help="CPU threads (default: torch's, capped at the cores the 1-minute load average leaves free, at "
                      "least 1: on a shared machine spin-waiting OpenMP threads are several times slower than one)")
    demo.add_argument("--device", default=d.device, help="cpu or cuda")
    demo.add_argument("--seed", type=int, default=d.seed, help="seed of runs 1 and 2 (the cross-seed run uses seed+1)")
    demo.add_argument("--backend", choices=BACKENDS, default=d.backend, help="kernel backend")
    demo.add_argument("--quiet", action="store_true", help="no progress bars (default: shown)")
    demo.set_defaults(func=_cmd_demo)

    an = sub.add_parser(
        "analyze",
        help="measure the path of a run you already have, from its checkpoints (HF, Lightning, torch.save, DCP, ours)",
        description="Loads every checkpoint of RUN into the model and measures, against each reference, the "
        "gradients of K fixed probe batches (rows 'probe') and of the mean loss over all the data (row 'full'); lr "
        "comes from the checkpoints. RUN may be: a Hugging Face Trainer output_dir (checkpoint-N/ folders) or one "
        "save_pretrained folder (model.safetensors, sharded safetensors with their index, pytorch_model.bin); a "
        "folder of Lightning .ckpt or torch.save files (read with torch.load(weights_only=True) only); a "
        "torch.distributed.checkpoint folder, or a folder of them; a folder of our step_*.safetensors snapshots; "
        "or one file. Writes records.csv, summary.json, geometry.png (and per_tensor.csv with a heatmap) to --out. "
        "Under `torchrun --nproc-per-node N -m pathgeom_fast.cli analyze ...` the model is sharded with FSDP2 and "
        "each rank reads only its slices of every checkpoint.",
        formatter_class=_DefaultsHelpFormatter,
    )
    an.add_argument("run", help="run directory or checkpoint (see above)")
    an.add_argument(
        "--model", default=None,
        help="module:function returning the nn.Module (no arguments; the current directory is importable); not "
        "needed for Hugging Face checkpoints, whose config.json describes the model",
    )
    an.add_argument(
        "--data", required=True,
        help="module:function returning the data: a map-style dataset or a list of samples (tuples or dicts of "
        "tensors, e.g. a Trainer's train_dataset), a tuple of tensors (inputs, targets), a DataLoader (your "
        "collate_fn), or a list of collated batches with --batched",
    )
    an.add_argument("--batched", action="store_true", help="--data returns a list of collated batches, not samples")
    an.add_argument(
        "--loss", default=None,
        help="module:function(model, batch) -> scalar loss; default: the model output's .loss (dict batches are "
        "passed as model(**batch)), else cross-entropy of model(inputs) against targets",
    )
    an.add_argument(
        "--reference", action="append", default=None, metavar="REF",
        help="reference point x*, repeatable (each gives its own rows): 'last' (the last checkpoint, named "
        "xstar; the default), 'first' (x0), a checkpoint of any supported format, or NAME=PATH. A checkpoint is "
        "never measured against itself",
    )
    mode = an.add_mutually_exclusive_group()
    mode.add_argument(
        "--eval", dest="train_mode", action="store_false",
        help="(default) model.eval(): no dropout, so every checkpoint's gradient is that of the same deterministic "
        "function rather than of a random dropout mask; BatchNorm then uses its running statistics from the checkpoint",
    )
    mode.add_argument(
        "--train-mode", dest="train_mode", action="store_true",
        help="model.train(): the training objective, dropout on (the same seeded masks at every checkpoint) and "
        "BatchNorm with batch statistics",
    )
    an.set_defaults(train_mode=False)
    an.add_argument("--out", default="pathgeom-analysis", help="output directory")
    an.add_argument("--probe-batches", type=int, default=8, help="K probe batches (the same at every checkpoint)")
    an.add_argument("--batch-size", type=_positive_int, default=32, help="probe batch size (samples)")
    an.add_argument("--full-batch-size", type=_positive_int, default=1024, help="chunk size for the full-data gradient")
    an.add_argument("--no-full-batch", action="store_true", help="skip the full-data gradient (the 'full' rows)")
    an.add_argument("--per-tensor", action="store_true", help="also per-tensor rows (per_tensor.csv) and a heatmap")
    an.add_argument("--heatmap", choices=("cos", "rsi"), default="cos", help="quantity of the per-tensor heatmap")
    an.add_argument("--key-prefix", default=None, help="checkpoint key prefix to read as the model's names, when several fit (e.g. 'ema.')")
    an.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    an.add_argument("--seed", type=int, default=0, help="seed of the probe draw and of dropout in --train-mode")
    an.add_argument("--backend", choices=BACKENDS, default="auto", help="kernel backend")
    an.add_argument("--quiet", action="store_true", help="no progress bar")
    an.add_argument("--debug", action="store_true", help="show the traceback of errors")
    an.set_defaults(func=_cmd_analyze)

    from .bench import DESCRIPTION, add_arguments

    be = sub.add_parser(
        "bench",
        help="time the fused op against naive PyTorch and the bandwidth limit on this device (--quick: under a minute)",
        description=DESCRIPTION,
        formatter_class=_DefaultsHelpFormatter,
    )
    add_arguments(be)
    be.set_defaults(func=_cmd_bench)

    cmp = sub.add_parser(
        "compare",
        help="several demo/analyze output folders side by side: compare.json, compare.md, compare.png",
        description="Reads each RUN_DIR's summary.json and records.csv and writes, to --out: compare.json (per run: the "
        "settings that differ from the first run, D, final loss and accuracy, mu and L of the full-batch rows, eta_opt = "
        "mu/L^2, rate_opt = 1 - mu^2/L^2, the learning rates used and the implied factor 1 - 2 lr mu + lr^2 L^2, the median "
        "cos against 1/sqrt(D), the actual median per-step contraction of ||x - x*||^2, the claims of findings.md), "
        "compare.md (a table and computed sentences) and compare.png.",
        formatter_class=_DefaultsHelpFormatter,
    )
    cmp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output folders of pathgeom demo or analyze")
    cmp.add_argument("--out", default="pathgeom-compare", help="output directory")
    cmp.add_argument("--labels", nargs="+", default=None, help="one label per run (default: the folder names)")
    cmp.set_defaults(func=_cmd_compare)

    from .sweep import SWEEPABLE

    sw = sub.add_parser(
        "sweep",
        help="run a demo task over several values of one setting (--lr 0.01 0.1 ...), then compare the runs",
        description="Each value is a full two-run measurement (as pathgeom demo) into OUT/SETTING=VALUE; then the "
        "comparison (as pathgeom compare) is written to OUT and a line says how much mu, L, eta_opt and the final loss "
        "move across the sweep. Give exactly one of the settings below several values; a setting given one value holds "
        "for every run. Options left unset take the task's defaults.",
        formatter_class=_DefaultsHelpFormatter,
    )
    sw.add_argument("--task", choices=TASKS, default=None, help="workload (default: mlp)")
    sw.add_argument("--out", default="pathgeom-sweep", help="output directory (one subfolder per run)")
    types = {"lr": _finite_float(0, strict=True), "init_scale": _finite_float(0, strict=True), "seed": int,
             "weight_decay": _finite_float(0, strict=False), "clip_grad_norm": _finite_float(0, strict=False),
             "optimizer": str, "schedule": str}
    choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES}
    for key in SWEEPABLE:
        sw.add_argument("--" + key.replace("_", "-"), nargs="+", type=types.get(key, _positive_int), choices=choices.get(key),
                        default=None, metavar="V", help="values to sweep, or one value for every run (default: the task's)")
    sw.add_argument("--no-batchnorm", dest="batchnorm", action="store_false", help="every run without BatchNorm (cnn, resnet)")
    sw.add_argument("--no-skip", dest="skip", action="store_false", help="every run without skip connections (resnet)")
    sw.add_argument("--probe-batches", type=int, default=None, help="K fixed probe minibatches (default: the task's)")
    sw.add_argument("--probe-every", type=int, default=None, help="probes and full batch every N steps (default: the task's)")
    sw.add_argument("--snapshot-every", type=int, default=None, help="snapshot run 1 every N steps, 0: only x* (default: the task's)")
    sw.add_argument("--lags", type=_parse_lags, default=d.lags, metavar="K,K,...", help="lags of the lagged cosine, or 'none'")
    sw.add_argument("--lag-every", type=_positive_int, default=None, help="anchor steps of the lagged cosine (default: the task's)")
    sw.add_argument("--cross-seed", action=argparse.BooleanOptionalAction, default=None,
                    help="control run from seed+1 in every run (default: the task's)")
    sw.add_argument("--x0-reference", action=argparse.BooleanOptionalAction, default=None,
                    help="measure against x_0 too (default: the task's)")
    sw.add_argument("--no-full-batch", action="store_true", help="skip the full-batch gradient (mu and L then come from the probes)")
    sw.add_argument("--context", type=_positive_int, default=None, help="lm: tokens per sequence (default: 64)")
    sw.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: as demo)")
    sw.add_argument("--device", default=d.device, help="cpu or cuda")
    sw.add_argument("--backend", choices=BACKENDS, default=d.backend, help="kernel backend")
    sw.add_argument("--quiet", action="store_true", help="no progress bar")
    sw.set_defaults(func=_cmd_sweep)
    return p


def main(argv=None) -> int:
    from .analyze import AnalysisError
    from ..checkpoints.core import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, AnalysisError, CheckpointError, FileNotFoundError) as exc:
        if getattr(args, "debug", False) or os.environ.get("PATHGEOM_DEBUG"):
            raise
        hint = " (--debug shows the traceback)" if hasattr(args, "debug") else ""
        print(f"pathgeom {args.command}: error: {exc}{hint}", file=sys.stderr)
        return 2
