"""The argparse parser of ``pathgeom``: its subcommands (demo, analyze, bench, compare, sweep)
and their options, the help formatter and the argument types. :mod:`.commands` runs the
command a parse names (``args.command``).
"""

from __future__ import annotations

import argparse
import math

from .version import _VersionAction


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

    from .bench import DESCRIPTION, add_arguments

    be = sub.add_parser(
        "bench",
        help="time the fused op against naive PyTorch and the bandwidth limit on this device (--quick: under a minute)",
        description=DESCRIPTION,
        formatter_class=_DefaultsHelpFormatter,
    )
    add_arguments(be)

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
    return p
