"""From records to what a reader sees: ``records`` (the csv files and strict JSON), ``summary``
(per-reference summaries, the printed table, the report folder), ``figures`` (geometry.png),
``findings`` (the paper's claims checked), ``heatmap`` and ``compare`` (runs
side by side). ``pathgeom_fast.report`` keeps the names the old ``report`` module had."""

from .figures import plot
from .records import COLUMNS, LAGGED, json_safe, read_csv, references_of, write_csv
from .summary import (
    METRICS,
    NAMED_STEPS,
    QUANTILES,
    format_table,
    summarize,
    tail_start,
    tensorboard_writer,
    write_report,
)

__all__ = ["COLUMNS", "LAGGED", "METRICS", "NAMED_STEPS", "QUANTILES", "format_table", "json_safe", "plot",
           "read_csv", "references_of", "summarize", "tail_start", "tensorboard_writer", "write_csv", "write_report"]
