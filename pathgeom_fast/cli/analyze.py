"""Post-hoc analysis of a run's checkpoints: the geometry of a path that was not tracked live.

    from pathgeom_fast.checkpoints import open_run
    from pathgeom_fast.analyze import analyze, batches_from_data

    run = open_run("hf_out")                       # any supported format (see checkpoints.open_run)
    probes, full = batches_from_data(train_set, batch_size=32, probe_batches=8)
    result = analyze(run, model, probes, full, references=["last", "first"], per_tensor=True)
    result.records                                 # rows as PathTracker.records

At every checkpoint x_t of the run (loaded into ``model``) and for every reference point x*,
rows of (a, b, c) = (<g, x_t - x*>, ||g||^2, ||x_t - x*||^2) and their ratios for:

* ``probe``: the gradients of K fixed batches (the same batches at every checkpoint);
* ``full``: the gradient of the mean loss over all the data (batches weighted by size).

There is no training minibatch here (the one the run used is not known), so there are no
``minibatch`` or ``update`` rows. ``lr`` is the checkpoint's learning rate (that of the step
taken from it) where the checkpoint tells it; ``loss`` is the probe batch's loss or the
full-data mean loss at x_t. A checkpoint is never measured against itself: a reference that
is the same file, or that x_t equals exactly (c = 0), gives no rows at that step (listed in
``skipped``).

The model is put in eval mode by default (dropout off: the gradient is that of one
deterministic function at every checkpoint, not a random one); BatchNorm then normalises with
its running statistics, which come from the checkpoint when it holds them (our own snapshots
hold only the trainable parameters, see ``notes``). ``train_mode=True`` measures the training
objective instead: dropout active with the same seeded masks at every checkpoint, BatchNorm
with batch statistics (its running statistics are restored afterwards).

Sharded models (FSDP2 ``fully_shard``, run under torchrun) work as they are: each rank loads
only its slices of every checkpoint and reference, gradients are FSDP2's, statistics are
all-reduced once per call; every rank computes the same batches, so the rows equal the
single-process ones.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from ..path.batches import batch_size as _batch_size
from ..path.batches import default_loss, to_device
from ..checkpoints.keys import trainable
from ..checkpoints.reference import Checkpoint, Reference, Run, open_checkpoint, open_run
from ..ops.wrappers import secant_stats, secant_stats_multi
from ..path.geometry import metrics

Tensor = torch.Tensor

__all__ = [
    "Analysis",
    "AnalysisError",
    "analyze",
    "analyze_snapshots",
    "batches_from_data",
    "model_from_hf_config",
    "parse_reference",
    "shard_model",
]

FIRST = ("first", "x0")
LAST = ("last", "xstar")


class AnalysisError(ValueError):
    """A mistake in what analyze was given (data, loss, references); the message says which."""


class Analysis:
    """What :func:`analyze` measured.

    ``records`` and ``per_tensor_records``: rows as ``PathTracker.records`` (grouped by
    reference, in the order the references were given); ``references``: name -> source of
    each reference; ``skipped``: {step, reference, why} for every (checkpoint, reference) pair
    not measured; ``notes``: things the user should know (missing buffers, ...); ``numel``:
    the number of trainable parameters (D)."""

    def __init__(self, records, per_tensor_records, references, skipped, notes, numel):
        self.records, self.per_tensor_records = records, per_tensor_records
        self.references, self.skipped, self.notes, self.numel = references, skipped, notes, numel


# ------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------


def parse_reference(spec: str, run: Run) -> tuple[str, Checkpoint]:
    """(name, checkpoint) of a ``--reference`` value.

    ``last`` (or ``xstar``): the run's last checkpoint, named "xstar"; ``first`` (or ``x0``):
    its first, named "x0"; ``NAME=PATH``: any supported checkpoint, named NAME; ``PATH``: the
    same, named after the file or folder."""
    s = spec.strip()
    if s.lower() in LAST:
        return "xstar", run.checkpoints[-1]
    if s.lower() in FIRST:
        return "x0", run.checkpoints[0]
    name, sep, path = s.partition("=")
    if sep and name and not os.path.exists(s) and "/" not in name and os.sep not in name:
        return name, open_checkpoint(path)
    base = os.path.basename(os.path.normpath(s))
    for suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    if base in ("model", "pytorch_model"):  # a HF weights file: name it after its folder
        base = os.path.basename(os.path.dirname(os.path.abspath(s)))
    return base or s, open_checkpoint(s)


def _references(run: Run, model: torch.nn.Module, specs: Sequence[str | Reference], key_prefix: str | None):
    """[(name, files of the reference checkpoint or None, Reference)]."""
    out, names = [], set()
    for spec in specs:
        if isinstance(spec, Reference):
            name, files, ref = spec.name, None, spec
        else:
            name, ck = parse_reference(spec, run)
            files = ck.files()
            ref = ck.reference(model, name=name, key_prefix=key_prefix)
        if name in names:
            raise AnalysisError(f"two references are named {name!r}; name them with NAME=PATH")
        names.add(name)
        out.append((name, files, ref))
    if not out:
        raise AnalysisError("no reference given")
    return out


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


def _tensorize(sample):
    """Lists of numbers inside a mapping sample (Hugging Face datasets rows) -> tensors."""
    if isinstance(sample, Mapping):
        return {
            k: (torch.tensor(v) if isinstance(v, list) and v and all(isinstance(x, (int, float, bool)) for x in v) else _tensorize(v))
            for k, v in sample.items()
        }
    return sample


def _collate(samples: list) -> Any:
    try:
        return torch.utils.data.default_collate([_tensorize(s) for s in samples])
    except (RuntimeError, TypeError, ValueError) as exc:
        raise AnalysisError(
            f"cannot stack the samples into a batch ({str(exc).splitlines()[0][:200]}); for samples of different "
            "lengths return a DataLoader with your collate_fn (or a list of collated batches with --batched)"
        ) from exc


def batches_from_data(
    data: Any,
    *,
    batch_size: int = 32,
    probe_batches: int = 8,
    full_batch_size: int = 1024,
    full: bool = True,
    seed: int = 0,
    batched: bool | None = None,
) -> tuple[list, list | None]:
    """(probe batches, full-data batches or None) from data as users have it.

    * a map-style dataset (``torch.utils.data.Dataset``, a Hugging Face ``datasets.Dataset``,
      a list of samples such as a Trainer's ``train_dataset``), samples being tuples or dicts
      of tensors (lists of numbers in dicts become tensors): ``probe_batches`` random
      minibatches of ``batch_size`` samples (drawn with ``seed``), and the whole dataset in
      chunks of ``full_batch_size``;
    * a tuple of tensors ``(inputs, targets, ...)``: the same, as a TensorDataset;
    * batches already collated: a ``DataLoader`` (your collate_fn, padding...) or any iterable
      without indexing, or a list of batches with ``batched=True``: the first
      ``probe_batches`` batches are the probes, all of them the full data.
    """
    if batch_size <= 0 or full_batch_size <= 0 or probe_batches < 0:
        raise AnalysisError("batch sizes must be positive and the number of probe batches >= 0")
    if isinstance(data, tuple) and data and all(isinstance(t, Tensor) for t in data):
        data = torch.utils.data.TensorDataset(*data)
    is_loader = isinstance(data, torch.utils.data.DataLoader) or (
        isinstance(data, Iterable) and not hasattr(data, "__getitem__") and not isinstance(data, Mapping)
    )
    if is_loader or (batched and isinstance(data, Sequence)):
        batches = list(data)
        if not batches:
            raise AnalysisError("the data gave no batches")
        return batches[:probe_batches], (batches if full else None)
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")) or isinstance(data, (Mapping, str, Tensor)):
        raise AnalysisError(
            f"the data is a {type(data).__name__}: expected a map-style dataset or a list of samples, a DataLoader, "
            "a list of collated batches (batched), or a tuple of tensors (inputs, targets)"
        )
    n = len(data)
    if n == 0:
        raise AnalysisError("the dataset is empty")
    if probe_batches > 1 and batch_size >= n:
        raise AnalysisError(
            f"the probe batch size ({batch_size}) is not below the dataset's {n} samples: all {probe_batches} "
            f"probe batches would be the whole dataset, i.e. {probe_batches} copies of the full-batch gradient; "
            "pass a smaller batch size (--batch-size), or --probe-batches 1 (or 0) for the full batch alone"
        )
    gen = torch.Generator().manual_seed(seed)
    probes = []
    for _ in range(probe_batches):
        idx = torch.randperm(n, generator=gen)[:batch_size].tolist()
        probes.append(_collate([data[i] for i in idx]))
    full_batches = [_collate([data[i] for i in range(j, min(n, j + full_batch_size))]) for j in range(0, n, full_batch_size)] if full else None
    return probes, full_batches


# ------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------


def model_from_hf_config(config_dir: str) -> torch.nn.Module:
    """The model a Hugging Face ``config.json`` describes (its ``architectures`` class from
    transformers), randomly initialised: the weights come from the checkpoints. Nothing is
    downloaded (``local_files_only``); models needing their own code (``auto_map``) need --model."""
    try:
        import transformers
    except ImportError as exc:
        raise AnalysisError(
            f"{config_dir}/config.json describes a Hugging Face model, and building it needs transformers "
            "(pip install transformers, or from the checkout pip install --no-build-isolation '.[hf]'); or pass --model module:function"
        ) from exc
    try:
        config = transformers.AutoConfig.from_pretrained(config_dir, local_files_only=True)
    except Exception as exc:
        raise AnalysisError(f"cannot read the model configuration {config_dir}/config.json ({exc}); pass --model module:function") from exc
    archs = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        what = f"names the architecture {archs[0]!r}, which transformers does not have" if archs else "names no architecture"
        raise AnalysisError(f"{config_dir}/config.json {what}; pass --model module:function")
    return cls(config)


def shard_model(model: torch.nn.Module, device: str | torch.device = "cpu") -> torch.nn.Module:
    """FSDP2 over all ranks of the initialised process group: each transformer block (a Hugging
    Face model's ``_no_split_modules``) is its own unit, then the root. The parameters become
    DTensors; checkpoints and references are then read slice by slice."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for m in model.modules():
        if m is not model and type(m).__name__ in blocks:
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# ------------------------------------------------------------------------------------------
# The measurement
# ------------------------------------------------------------------------------------------


def _is_dtensor(t) -> bool:
    from ..ops.distributed import is_dtensor

    return is_dtensor(t)


def _gradient(model, params, loss_fn, batch, sharded: bool) -> tuple[list[Tensor], Tensor]:
    with torch.enable_grad():
        loss = loss_fn(model, batch)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise AnalysisError(f"the loss function returned {type(loss).__name__} {getattr(loss, 'shape', '')}, not a scalar tensor")
        if not sharded:
            grads = list(torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True))
        else:  # FSDP2 gives the sharded gradients to .grad in its backward hooks
            for p in params:
                p.grad = None
            loss.backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            for p in params:
                p.grad = None
    return grads, loss.detach().reshape(())


@contextlib.contextmanager
def _measuring(model: torch.nn.Module, train_mode: bool, seed: int, params):
    """The model in the chosen mode, the RNG seeded the same for every checkpoint (dropout masks
    alike across checkpoints in train mode) and restored after, buffers restored after."""
    was = model.training
    buffers = list(model.buffers())
    saved = [b.detach().clone() for b in buffers]
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    model.train(train_mode)
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield
    finally:
        model.train(was)
        with torch.no_grad():
            for b, v in zip(buffers, saved):
                b.copy_(v)


def _device_of(params) -> torch.device:
    p = params[0]
    return p.to_local().device if _is_dtensor(p) else p.device


def _rows(step, kind, name, lr, stats, losses, names, per_tensor):
    """Whole-model rows (and per-tensor rows) from stats [K, T, 3] (per_tensor) or [K, 3]."""
    rows, trows = [], []
    host = stats.detach().cpu().tolist()
    for k, (st, loss) in enumerate(zip(host, losses)):
        if per_tensor:
            for tname, (a, b, c) in zip(names, st):
                r = {"step": step, "kind": kind, "sample": k, "reference": name, "lr": lr, "loss": loss, **metrics(a, b, c), "a": a, "b": b, "c": c}
                r["tensor"] = tname
                trows.append(r)
            a, b, c = (float(sum(x[i] for x in st)) for i in range(3))
        else:
            a, b, c = st
        rows.append({"step": step, "kind": kind, "sample": k, "reference": name, "lr": lr, "loss": loss, **metrics(a, b, c), "a": a, "b": b, "c": c})
    return rows, trows


def analyze(
    run: Run | str,
    model: torch.nn.Module,
    probe_batches: Sequence[Any] = (),
    full_batch: Sequence[Any] | None = None,
    *,
    loss_fn: Callable[[torch.nn.Module, Any], Tensor] | None = None,
    references: Sequence[str | Reference] = ("last",),
    per_tensor: bool = False,
    backend: str = "auto",
    train_mode: bool = False,
    seed: int = 0,
    key_prefix: str | None = None,
    progress: bool = True,
) -> Analysis:
    """Measure every checkpoint of ``run`` (a :class:`Run` or a path for :func:`open_run`)
    against every reference (``"last"``, ``"first"``, a checkpoint path, ``NAME=PATH``, or a
    :class:`Reference`). See the module docstring for the rows. ``loss_fn(model, batch)``
    defaults to :func:`pathgeom_fast.batches.default_loss`; batches are moved to the model's
    device one at a time."""
    run = open_run(run) if isinstance(run, (str, os.PathLike)) else run
    if not run.checkpoints:
        raise AnalysisError(f"{run.path} holds no checkpoints")
    probe_batches = list(probe_batches)
    full_batch = list(full_batch) if full_batch is not None else None
    if not probe_batches and not full_batch:
        raise AnalysisError("nothing to measure: no probe batches and no full-data batches")
    loss_fn = loss_fn or default_loss
    named = trainable(model)
    names = [n for n, _ in named]
    params = [p for _, p in named]
    sharded = _is_dtensor(params[0]) if params else False
    device = _device_of(params) if params else torch.device("cpu")
    refs = _references(run, model, references, key_prefix)
    for _, _, r in refs:
        r.check_matches(model)
    full_sizes = [_batch_size(b) for b in full_batch] if full_batch else []
    total = sum(full_sizes)
    kw = dict(backend=backend)

    records: dict[str, list[dict]] = {name: [] for name, _, _ in refs}
    per: dict[str, list[dict]] = {name: [] for name, _, _ in refs}
    skipped: list[dict] = []
    notes = list(run.notes)
    missing_noted = False
    first = True

    from tqdm.auto import tqdm

    for ck in tqdm(run.checkpoints, desc="checkpoints", disable=not progress):
        active = []
        for name, files, ref in refs:
            if files is not None and files & ck.files():
                skipped.append({"step": ck.step, "reference": name, "why": "the checkpoint is the reference"})
            else:
                active.append((name, ref))
        if not active:
            continue
        m = ck.load_into(model, key_prefix)
        if m.missing_optional and not missing_noted:
            missing_noted = True
            bn = [n for n in m.missing_optional if n.endswith(("running_mean", "running_var"))]
            notes.append(
                f"the checkpoints hold no values for {len(m.missing_optional)} of the model's frozen parameters or buffers "
                f"(e.g. {m.missing_optional[:3]}): the values the model was built with are used"
                + ("; in eval mode BatchNorm normalises with those running statistics (--train-mode uses batch statistics)"
                   if bn and not train_mode else "")
            )
        with _measuring(model, train_mode, seed, params):
            try:
                probe = [_gradient(model, params, loss_fn, to_device(b, device), sharded) for b in probe_batches]
                full = None
                if full_batch:
                    acc, loss_acc = None, None
                    for b, nb in zip(full_batch, full_sizes):
                        g, loss = _gradient(model, params, loss_fn, to_device(b, device), sharded)
                        w = nb / total
                        if acc is None:
                            acc, loss_acc = [x * w for x in g], loss * w
                        else:
                            for a_, x in zip(acc, g):
                                a_.add_(x, alpha=w)
                            loss_acc = loss_acc + loss * w
                        del g
                    full = (acc, loss_acc)
            except AnalysisError:
                raise
            except Exception as exc:
                if not first:
                    raise
                raise AnalysisError(
                    f"computing the loss and its gradient at {ck.path} failed: {type(exc).__name__}: "
                    f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''} (do the data and the loss fit the model?)"
                ) from exc
        first = False
        probe_losses = [float(loss) for _, loss in probe]
        for name, ref in active:
            blocks = []
            if probe:
                s = secant_stats_multi([g for g, _ in probe], params, ref.tensors, per_tensor=per_tensor, **kw)
                blocks.append(("probe", s, probe_losses))
            if full is not None:
                s = secant_stats(full[0], params, ref.tensors, per_tensor=per_tensor, **kw)
                blocks.append(("full", s.unsqueeze(0), [float(full[1])]))
            new, new_t = [], []
            for kind, s, losses in blocks:
                r, t = _rows(ck.step, kind, name, ck.lr, s, losses, names, per_tensor)
                new += r
                new_t += t
            if new and new[0]["c"] == 0.0:
                skipped.append({"step": ck.step, "reference": name, "why": "x = x* exactly (the same point)"})
                continue
            records[name] += new
            per[name] += new_t
        del probe, full
    for p in params:
        p.grad = None
    ordered = [r for name, _, _ in refs for r in records[name]]
    ordered_t = [r for name, _, _ in refs for r in per[name]]
    if not ordered:
        raise AnalysisError(
            f"nothing measured: every checkpoint of {run.path} is a reference "
            f"({len(run.checkpoints)} checkpoint(s)); pass another --reference"
        )
    numel = sum(p.numel() for p in params)
    return Analysis(ordered, ordered_t, {name: ref.source or name for name, _, ref in refs}, skipped, notes, numel)


def analyze_snapshots(
    directory: str,
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], Tensor],
    probe_batches: Sequence[Any],
    full_batch: Iterable[Any] | None = None,
    reference: str | None = None,
    backend: str = "auto",
    per_tensor: bool = False,
    progress: bool = True,
) -> tuple[list[dict], list[dict]]:
    """Rows (probe and full, as :func:`analyze`) for every checkpoint in ``directory`` against
    ``reference`` (a checkpoint path; default: the last checkpoint), the model in eval mode.
    Returns (records, per_tensor_records). Kept for code written against ``snapshots``."""
    res = analyze(
        directory, model, probe_batches, list(full_batch) if full_batch is not None else None, loss_fn=loss_fn,
        references=[reference or "last"], per_tensor=per_tensor, backend=backend, progress=progress,
    )
    return res.records, res.per_tensor_records
