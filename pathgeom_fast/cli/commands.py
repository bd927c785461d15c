"""The ``pathgeom`` command line: what each command (demo, analyze, bench, compare, sweep) does
with its parsed arguments, and ``main``. The parser is in :mod:`.parser`, ``--version`` in
:mod:`.version`."""

from __future__ import annotations

import importlib
import math
import os
import sys

from .parser import build_parser
from .version import _backend_used, backend_note


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


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


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
    from ..checkpoints.reference import open_run

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


COMMANDS = {"demo": _cmd_demo, "analyze": _cmd_analyze, "bench": _cmd_bench, "compare": _cmd_compare, "sweep": _cmd_sweep}


def main(argv=None) -> int:
    from .analyze import AnalysisError
    from ..checkpoints.reader import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (UsageError, AnalysisError, CheckpointError, FileNotFoundError) as exc:
        if getattr(args, "debug", False) or os.environ.get("PATHGEOM_DEBUG"):
            raise
        hint = " (--debug shows the traceback)" if hasattr(args, "debug") else ""
        print(f"pathgeom {args.command}: error: {exc}{hint}", file=sys.stderr)
        return 2
