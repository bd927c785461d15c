"""What a :class:`~pathgeom_fast.integrations.step_measurer.StepMeasurer` gives to read: the
last measured step's scalars for a logger (device tensors, or floats in one host copy), the
rows of every measured step, and the report of them.

A mixin of ``StepMeasurer`` (never imported from here): it reads the measurer's ``tracker``
and ``_measured_step``, and copies to the host with its ``to_host`` (which also checks the
losses).
"""

from __future__ import annotations

from typing import Any

import torch

from .helpers import metric_tensors

Tensor = torch.Tensor
KEYS = ("rsi", "eb", "cos", "eta_star")


class Readings:
    """``scalars`` / ``tensor_scalars``, ``last``, ``records``, ``per_tensor_records``, ``write_report``."""

    def tensor_scalars(self, prefix: str = "pathgeom/") -> dict[str, Tensor]:
        """The last measured step's metrics as 0-dim device tensors (no transfer), keyed
        ``pathgeom/rsi``, ``pathgeom/update_rsi``, ``pathgeom/full_rsi``, ``pathgeom/probe_rsi``
        (median over the probes; also ``probe_rsi_min``, ``probe_cos_min``, ``probe_eb_max``),
        ``pathgeom/tensor/<name>/rsi`` (``per_tensor=True``), ``...@<name>`` for secondary references."""
        if self.tracker is None or self._measured_step is None:
            return {}
        t, primary = self._measured_step, self.tracker.ref.name
        out: dict[str, Tensor] = {}
        for (kind, ref), (step, stats) in sorted(self.tracker.last_stats().items()):
            if step != t:
                continue
            tag = "" if kind == "minibatch" else f"{kind}_"
            sfx = "" if ref == primary else f"@{ref}"
            m = metric_tensors(stats)
            if stats.shape[0] == 1:
                for k in KEYS:
                    out[f"{prefix}{tag}{k}{sfx}"] = m[k][0]
            else:  # K probe batches
                for k in KEYS:
                    out[f"{prefix}{tag}{k}{sfx}"] = torch.quantile(m[k], 0.5)
                out[f"{prefix}{tag}rsi_min{sfx}"] = m["rsi"].min()
                out[f"{prefix}{tag}cos_min{sfx}"] = m["cos"].min()
                out[f"{prefix}{tag}eb_max{sfx}"] = m["eb"].max()
        if self.per_tensor:
            names = self.tracker.names
            for (kind, ref), (step, stats) in sorted(self.tracker.last_stats(per_tensor=True).items()):
                if step != t:
                    continue
                sfx = "" if ref == primary else f"@{ref}"
                tag = "" if kind == "minibatch" else f"{kind}_"
                m = metric_tensors(stats)
                for i, name in enumerate(names):
                    for k in KEYS:
                        out[f"{prefix}tensor/{name}/{tag}{k}{sfx}"] = m[k][i]
        return out

    def scalars(self, prefix: str = "pathgeom/") -> dict[str, float]:
        """The last measured step's metrics as floats for a logger (keys as
        :meth:`tensor_scalars`): one device-to-host copy, together with the losses kept since the
        last read, which are then checked against run 1's."""
        tens = self.tensor_scalars(prefix)
        vals = self.to_host(list(tens.values()))
        return dict(zip(tens, vals))

    @property
    def last(self) -> dict[str, Any] | None:
        """Rows of the last measured step (primary reference, first sample), by kind."""
        if self.tracker is None or self._measured_step is None:
            return None
        self.tracker.flush()
        ref = self.tracker.ref.name
        out = {}
        for row in reversed(self.tracker._records):
            if row["step"] != self._measured_step:
                break
            if row["reference"] == ref and row["sample"] == 0 and row["kind"] not in out:
                out[row["kind"]] = row
        return out or None

    @property
    def records(self) -> list[dict]:
        return self.tracker.records if self.tracker is not None else []

    @property
    def per_tensor_records(self) -> list[dict]:
        return self.tracker.per_tensor_records if self.tracker is not None else []

    def write_report(self, out_dir: str, title: str = "") -> dict:
        """records.csv, per_tensor.csv (with ``per_tensor=True``), summary.json, geometry.png and
        findings.md of the steps measured so far (:func:`pathgeom_fast.report.write_report`),
        with D (the trainable parameters) and, after :meth:`finish`, the replay's
        ``final_distance_ratio``. Call it on the rank that should write; returns the summary."""
        from ..ops.wrappers import numel_of
        from ..report.summary import write_report

        if self.tracker is None:
            raise RuntimeError(f"{self.framework}: nothing measured yet (no reference, or no measured step)")
        numel = numel_of(self.tracker.model)  # its trainable parameters
        extra = {"replay_final_distance_ratio": self.final_distance_ratio} if self.final_distance_ratio is not None else None
        return write_report(out_dir, self.records, self.per_tensor_records, numel, title, extra, findings=True)
