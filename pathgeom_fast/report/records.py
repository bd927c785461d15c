"""The rows of a report on disk: the columns of records.csv and per_tensor.csv, writing and
reading them, the references and the ``lagged`` kind the rows hold, and strict-JSON values
(:func:`json_safe`) for summary.json and compare.json.
"""

from __future__ import annotations

import csv
import math


COLUMNS = ["step", "kind", "sample", "reference", "lr", "loss", "rsi", "eb", "cos", "eta_star", "a", "b", "c"]


def write_csv(rows: list[dict], path: str, columns: list[str] = COLUMNS) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def read_csv(path: str) -> list[dict]:
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = dict(r)
            for k in ("step", "sample"):
                row[k] = int(row[k])
            row["reference"] = row.get("reference") or "xstar"
            for k in ("lr", "loss", "rsi", "eb", "cos", "eta_star", "a", "b", "c"):
                if k in row:
                    row[k] = float(row[k]) if row[k] != "" else None
            out.append(row)
    return out


LAGGED = "lagged"


def references_of(records: list[dict]) -> list[str]:
    """Reference names in the order they first appear (the first is the primary one)."""
    return list(dict.fromkeys(r.get("reference") or "xstar" for r in records))


def json_safe(value):
    """``value`` with every NaN or +-inf float replaced by the string "NaN", "inf" or "-inf" (strict
    JSON has no such numbers; ``float()`` reads the strings back)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
