"""Old module paths, kept working after the move into subpackages.

Until December 2026 every module sat at the top of the package (``pathgeom_fast.tracker``,
``pathgeom_fast.triton_kernels``, ...). Code written against those paths keeps running:
importing an old path returns the *same module object* as the new one, not a copy, so a test
or a tuning script that sets one of its globals (``tk.NUM_WARPS = 8``) changes what the
kernels read. ``pathgeom_fast/__init__.py`` installs the finder first.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

# old path -> new path (both relative to the package)
MOVED = {
    "_ext": "ops.extension",
    "_shapes": "ops.shapes",
    "reference": "ops.torch_backend",
    "plan": "ops.triton_plan",
    "triton_kernels": "ops.triton_stats",
    "triton_gram": "ops.triton_gram",
    "distributed": "ops.distributed",
    "distributed_path": "checkpoints.sharding",
    "geometry": "path.geometry",
    "batches": "path.batches",
    "tracker": "path.tracker",
    "findings": "report.findings",
    "heatmap": "report.heatmap",
    "compare": "report.compare",
    "demo": "cli.demo",
    "tasks": "cli.tasks",
    "analyze": "cli.analyze",
    "sweep": "cli.sweep",
    "bench": "cli.bench",
}
PACKAGE = __name__.rpartition(".")[0]


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``pathgeom_fast.<old>`` and hands back the module at its new path."""

    def __init__(self):
        self._specs = {}

    def find_spec(self, fullname, path=None, target=None):
        package, _, old = fullname.rpartition(".")
        if package != PACKAGE or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(f"{PACKAGE}.{MOVED[spec.name.rpartition('.')[2]]}")
        self._specs[spec.name] = module.__spec__  # the import system overwrites __spec__ next
        return module

    def exec_module(self, module):
        module.__spec__ = self._specs.pop(module.__spec__.name)  # executed at its new path: keep its identity


def install() -> None:
    if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
        sys.meta_path.append(_OldPaths())
