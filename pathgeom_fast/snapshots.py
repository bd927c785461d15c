"""Kept for the old import path ``pathgeom_fast.snapshots``.

``SnapshotRecorder`` and the snapshot I/O live in :mod:`pathgeom_fast.checkpoints.snapshots`,
``Reference`` in :mod:`pathgeom_fast.checkpoints.reference`, and the post-hoc analysis
``analyze_snapshots`` in :mod:`pathgeom_fast.cli.analyze`; their names are re-exported here for
code written against this module.
"""

from .checkpoints.reference import Reference  # noqa: F401
from .checkpoints.snapshots import (  # noqa: F401
    SnapshotRecorder,
    _replicated_non_writer,
    list_snapshots,
    load_snapshot,
    save_snapshot,
    snapshot_keys,
    snapshot_meta,
    snapshot_path,
)
from .cli.analyze import analyze_snapshots  # noqa: F401
