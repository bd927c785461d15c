"""PEP 517 backend: setuptools, plus torch, ninja and numpy as build requirements only when
the compiled extension will be built.

`PATHGEOM_BUILD_EXT=0 pip install .` (or any install on a machine without a C++ compiler)
then needs nothing beyond setuptools and wheel and installs the pure-Python package. numpy
is listed with torch because importing torch without numpy prints "Failed to initialize
NumPy" during the build.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from setuptools import build_meta as _orig  # noqa: E402
from setuptools.build_meta import *  # noqa: E402,F401,F403

import pathgeom_build_config as _cfg  # noqa: E402

_EXT_REQUIRES = ["torch>=2.4", "ninja", "numpy"]


def _extra() -> list[str]:
    build, _ = _cfg.want_ext()
    return list(_EXT_REQUIRES) if build else []


def get_requires_for_build_wheel(config_settings=None):
    return _orig.get_requires_for_build_wheel(config_settings) + _extra()


def get_requires_for_build_editable(config_settings=None):
    return _orig.get_requires_for_build_editable(config_settings) + _extra()
