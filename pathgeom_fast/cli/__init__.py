"""The ``pathgeom`` command line and the applications behind it: ``demo`` (and its ``tasks``),
``analyze``, ``compare`` (in pathgeom_fast.report), ``sweep`` and ``bench``. ``parser`` builds
the parser, ``commands`` runs a command, ``version`` prints ``--version``; ``python -m
pathgeom_fast.cli`` is ``pathgeom``."""

from .commands import UsageError, main
from .parser import build_parser
from .version import backend_lines, backend_note, version_text

__all__ = ["UsageError", "backend_lines", "backend_note", "build_parser", "main", "version_text"]
