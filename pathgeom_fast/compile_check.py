"""``python -m pathgeom_fast.compile_check``, kept: the tool is :mod:`pathgeom_fast.ops.compile_check`."""

import sys

from .ops import compile_check as _tool

if __name__ == "__main__":
    sys.exit(_tool.main())
sys.modules[__name__] = _tool  # `import pathgeom_fast.compile_check` is the tool module itself
