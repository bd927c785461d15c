"""From records to what a reader sees: ``summary`` (csv, per-reference summaries, plots, the
report folder), ``findings`` (the paper's claims checked), ``heatmap`` and ``compare`` (runs
side by side). ``pathgeom_fast.report`` keeps the names the old ``report`` module had."""

from .summary import (
    COLUMNS,
    LAGGED,
    METRICS,
    NAMED_STEPS,
    QUANTILES,
    format_table,
    json_safe,
    plot,
    read_csv,
    references_of,
    summarize,
    tail_start,
    tensorboard_writer,
    write_csv,
    write_report,
)

__all__ = ["COLUMNS", "LAGGED", "METRICS", "NAMED_STEPS", "QUANTILES", "format_table", "json_safe", "plot",
           "read_csv", "references_of", "summarize", "tail_start", "tensorboard_writer", "write_csv", "write_report"]
