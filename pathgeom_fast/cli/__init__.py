"""The ``pathgeom`` command line and the applications behind it: ``demo`` (and its ``tasks``),
``analyze``, ``compare`` (in pathgeom_fast.report), ``sweep`` and ``bench``. ``commands`` builds
the parser and runs a command; ``python -m pathgeom_fast.cli`` is ``pathgeom``."""

from .commands import UsageError, backend_lines, backend_note, build_parser, main, version_text

__all__ = ["UsageError", "backend_lines", "backend_note", "build_parser", "main", "version_text"]
