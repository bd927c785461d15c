"""Matching a checkpoint's keys to a model's parameter names, and checking a state against
the model: missing keys, keys the model does not have, shapes, non-float dtypes, lower
precision than the parameters (:func:`check_state_against_model`, :func:`match_keys`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence

import torch

from .reader import FLOAT_DTYPES, CheckpointError, _as_dtype


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The named parameters that train (requires_grad), in ``named_parameters()`` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


_PRECISION = {torch.float16: 11, torch.bfloat16: 8, torch.float32: 24, torch.float64: 53}


def _prefix_hint(missing: list[str], keys) -> str:
    """When the state's keys are the parameter names behind (or without) a common prefix
    (``module.`` of DDP, ``_orig_mod.`` of torch.compile, ``model.`` of a wrapper), say so."""
    keys = set(keys)
    name = missing[0]
    for k in keys:
        if k.endswith("." + name):
            prefix = k[: -len(name)]
            if all(prefix + n in keys for n in missing):
                return (f"; its keys carry the prefix {prefix!r}: strip it, e.g. "
                        f"{{k.removeprefix({prefix!r}): v for k, v in state.items()}}")
        if name.endswith("." + k) or (name.split(".", 1)[-1] == k):
            prefix = name[: -len(k)]
            if all(n.startswith(prefix) and n[len(prefix):] in keys for n in missing):
                return (f"; the model's names carry the prefix {prefix!r} that its keys lack: add it, e.g. "
                        f"{{{prefix!r} + k: v for k, v in state.items()}}")
    return ""


def check_state_against_model(
    model: torch.nn.Module,
    info: Mapping[str, tuple[torch.dtype | str, Sequence[int]]],
    source: str,
    role: str = "reference",
) -> None:
    """Check a state (name -> (dtype, shape)) against the model's trainable parameters.

    Raises :class:`CheckpointError` (``KeyError`` for missing keys) naming ``source`` and the
    first offending key: a missing parameter, a key that is neither a parameter nor a buffer
    of the model, a shape that differs, a dtype that is not floating point. Warns (once, naming
    the keys) when the reference holds fewer mantissa bits than the parameter. ``role`` names
    the state in the messages ("reference", or "checkpoint" for a point x loaded into the model,
    which is not warned about precision: x is what the model holds).
    """
    named = trainable(model)
    missing = [n for n, _ in named if n not in info]
    if missing:
        raise CheckpointKeyError(
            f"{role} {source} lacks {len(missing)} of the model's {len(named)} trainable parameters, "
            f"first {missing[0]!r}" + (f" (also {missing[1:4]}{' ...' if len(missing) > 4 else ''})" if len(missing) > 1 else "")
            + f"; it has {len(info)} keys, e.g. {list(info)[:3]}" + _prefix_hint(missing, info)
        )
    # every name a parameter or buffer goes by: a tied weight (GPT-2's output layer and token
    # embedding) is in state_dict() under both of its names, in named_parameters() under one
    known = {n for n, _ in model.named_parameters(remove_duplicate=False)} | \
        {n for n, _ in model.named_buffers(remove_duplicate=False)}
    extra = [k for k in info if k not in known]
    if extra:
        raise CheckpointError(
            f"{role} {source} has {len(extra)} key(s) that are not parameters or buffers of the model, "
            f"first {extra[0]!r}" + (f" (also {extra[1:4]}{' ...' if len(extra) > 4 else ''})" if len(extra) > 1 else "")
            + "; is it the checkpoint of another model?"
        )
    lower = []
    for n, p in named:
        dt, shape = info[n]
        dt = _as_dtype(dt)
        if dt not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{role} {source}: {n!r} has dtype {dt}; the parameters need floating-point tensors "
                "(float16, bfloat16, float32 or float64)"
            )
        if tuple(shape) != tuple(p.shape):
            raise CheckpointError(
                f"{role} {source}: {n!r} has shape {list(shape)} but the model's parameter has {list(p.shape)}"
            )
        if role == "reference" and _PRECISION[dt] < _PRECISION.get(p.dtype, 0):
            lower.append((n, dt, p.dtype))
    if lower:
        n, dt, pdt = lower[0]
        warnings.warn(
            f"{role} {source} holds {len(lower)} tensor(s) in lower precision than the model's parameters "
            f"(e.g. {n!r}: {dt} vs {pdt}): x - x* then carries the rounding error of x* "
            f"(relative ~{2.0 ** -_PRECISION[dt]:.0e}), which dominates once x is that close to x*",
            UserWarning,
            stacklevel=3,
        )


class CheckpointKeyError(CheckpointError, KeyError):
    """A parameter of the model is missing from a checkpoint."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


_DROPPED_PARTS = {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}  # wrappers' attribute names


def _canonical(name: str) -> str:
    """Drop wrapper attribute names: torch.compile's ``_orig_mod``, FSDP1/activation-checkpoint
    wrappers anywhere, and DDP/DataParallel's leading ``module.``."""
    parts = [p for p in name.split(".") if p not in _DROPPED_PARTS]
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def _canonical_map(names) -> dict[str, str]:
    """canonical -> original; identity when canonical names would collide."""
    out: dict[str, str] = {}
    for n in names:
        c = _canonical(n)
        if c in out:
            return {n: n for n in names}
        out[c] = n
    return out


class KeyMatch:
    """How a checkpoint's keys map onto a model's names.

    ``keys``: model name -> checkpoint key, for every trainable parameter and for every other
    parameter and persistent buffer the checkpoint holds; ``prefix``: (checkpoint prefix,
    model prefix) that was replaced (``("", "")`` for identical names); ``missing_optional``:
    frozen parameters and persistent buffers of the model the checkpoint does not hold."""

    def __init__(self, keys: dict[str, str], prefix: tuple[str, str], missing_optional: list[str]):
        self.keys, self.prefix, self.missing_optional = keys, prefix, missing_optional

    def __repr__(self) -> str:
        return f"KeyMatch({len(self.keys)} keys, prefix={self.prefix}, missing_optional={len(self.missing_optional)})"


def _prefix_candidates(m0: str, ckpt: Sequence[str]) -> set[tuple[str, str]]:
    """(checkpoint prefix s, model prefix t) with s + rest in ckpt and m0 == t + rest, for every
    dotted tail ``rest`` of the model name m0."""
    parts = m0.split(".")
    out = set()
    for j in range(1, len(parts) + 1):
        rest = ".".join(parts[-j:])
        t = m0[: len(m0) - len(rest)]
        for k in ckpt:
            if k == rest or k.endswith("." + rest):
                out.add((k[: len(k) - len(rest)], t))
    return out


def match_keys(
    model: torch.nn.Module,
    info: Mapping[str, tuple[torch.dtype | str, Sequence[int]]],
    source: str,
    key_prefix: str | None = None,
    role: str = "reference",
) -> KeyMatch:
    """Map a checkpoint's keys (``info``: key -> (dtype, shape)) onto the model's names, then check
    them (:func:`check_state_against_model`).

    The names may differ by wrapper attributes (``module.`` of DDP, ``_orig_mod.`` of
    torch.compile) and by a prefix: a Lightning module's attribute (``model.``, ``net.``), a
    container key (``{"model": state_dict, ...}`` saved whole), or a base model's prefix
    (``transformer.``). The one mapping that covers every trainable parameter is used; when
    several would (e.g. ``model.`` and ``ema.`` copies of the same network), ``key_prefix``
    (the checkpoint prefix to use, e.g. ``"ema."``) chooses, else it is an error. Keys under
    the chosen prefix that are not parameters or buffers of the model are an error too.
    """
    named = trainable(model)
    if not named:
        raise CheckpointError("the model has no trainable parameters (requires_grad=True) to measure")
    ck = _canonical_map(info)
    train_ids = {id(p) for _, p in named}
    sd_keys = set(model.state_dict())
    all_params = list(model.named_parameters(remove_duplicate=False))
    # every name the model answers to (tied parameters under each of their names)
    known = [n for n, _ in all_params] + [n for n, _ in model.named_buffers(remove_duplicate=False)] + list(sd_keys)
    mod = _canonical_map(list(dict.fromkeys(known)))
    mod_inv = {v: k for k, v in mod.items()}
    train_c = [mod_inv[n] for n, _ in named]
    # other state: frozen parameters and persistent buffers, each once (tied copies of trainable ones left out)
    seen = set(train_ids)
    optional: dict[str, tuple[int, ...]] = {}
    for n, p in all_params:
        if id(p) not in seen:
            seen.add(id(p))
            optional[n] = tuple(p.shape)
    for n, b in model.named_buffers():
        if n in sd_keys and id(b) not in seen:
            seen.add(id(b))
            optional[n] = tuple(b.shape)

    def mapping(s: str, t: str) -> dict[str, str] | None:
        out = {}
        for c in train_c:
            if not c.startswith(t) or s + c[len(t):] not in ck:
                return None
            out[c] = s + c[len(t):]
        return out

    if key_prefix is not None:
        s = _canonical(key_prefix.strip(".")) + "." if key_prefix.strip(".") else ""
        found = mapping(s, "")
        if found is None:
            under = [k for k in ck if k.startswith(s)]
            raise CheckpointKeyError(
                f"{source}: with key prefix {key_prefix!r} the model's parameter {mod[train_c[0]]!r} would be "
                f"{s + train_c[0]!r}, which it does not hold"
                + (f" ({len(under)} keys start with the prefix, e.g. {[ck[k] for k in under[:3]]})" if under
                   else f" (no key starts with the prefix; its keys are e.g. {list(info)[:3]})")
            )
        valid = {(s, ""): found}
    else:
        valid = {}
        found = mapping("", "")
        if found is not None:
            valid[("", "")] = found  # identical names win
        else:
            for s, t in sorted(_prefix_candidates(train_c[0], list(ck))):
                found = mapping(s, t)
                if found is not None:
                    valid[(s, t)] = found
    if not valid:
        try:
            check_state_against_model(model, {mod.get(c, ck[c]): info[ck[c]] for c in ck}, source, role)
        except CheckpointKeyError as exc:
            raise CheckpointKeyError(f"{exc}; no prefix of its keys maps them onto the model's names either") from None
        raise CheckpointKeyError(f"{source}: its keys do not match the model's parameter names")  # pragma: no cover
    distinct: dict[tuple, tuple[str, str]] = {}
    for st, found in valid.items():
        distinct.setdefault(tuple(sorted(found.items())), st)
    if len(distinct) > 1:
        opts = [s for s, _ in distinct.values()]
        raise CheckpointError(
            f"{source}: the model's parameters match its keys under {len(opts)} different prefixes "
            f"({', '.join(repr(s) for s in opts[:5])}); choose one with --key-prefix (key_prefix=)"
        )
    s, t = next(iter(distinct.values()))
    found = valid[(s, t)]
    # keys under the prefix must belong to the model
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    extra = [
        ck[k] for k in ck
        if k.startswith(s) and (t + k[len(s):]) not in mod and not any(p.search(ck[k]) for p in ignore)
    ]
    if extra:
        raise CheckpointError(
            f"{role} {source} has {len(extra)} key(s) that are not parameters or buffers of the model, "
            f"first {extra[0]!r}" + (f" (also {extra[1:4]}{' ...' if len(extra) > 4 else ''})" if len(extra) > 1 else "")
            + (f" (with its prefix {s!r} read as {t!r})" if (s, t) != ("", "") else "")
            + "; is it the checkpoint of another model?"
        )
    keys = {mod[c]: ck[k] for c, k in found.items()}
    check_state_against_model(model, {n: info[k] for n, k in keys.items()}, source, role)
    missing = []
    for name, shape in optional.items():
        c = mod_inv[name]
        k = s + c[len(t):] if c.startswith(t) else None
        if k is None or k not in ck:
            missing.append(name)
            continue
        if tuple(info[ck[k]][1]) != shape:
            raise CheckpointError(
                f"{source}: {ck[k]!r} has shape {list(info[ck[k]][1])} but the model's {name!r} has {list(shape)}"
            )
        keys[name] = ck[k]
    return KeyMatch(keys, (s, t), missing)
