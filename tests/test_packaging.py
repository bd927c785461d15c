"""Installing like a real package: pure-Python installs, sdist and wheel, `--version`.

Each test copies the project's files (git ls-files) to a temporary directory and builds
there, so the working tree (and its in-place extension) is left alone. Nothing is
downloaded: builds run without isolation against this environment's setuptools.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import pathgeom_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copy_project(dst) -> str:
    src = os.path.join(str(dst), "src")
    try:
        files = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is needed to list the project's files")
    for f in files:
        if f and os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.join(src, os.path.dirname(f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(src, f))
    return src


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATHGEOM_") and k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


_INSTALLS = {  # how -> (environment of the install, what extension_error() then says)
    "no_compiler": ({"CXX": "/nonexistent/c++"}, "no C++ compiler"),
    "build_ext_0": ({"PATHGEOM_BUILD_EXT": "0"}, "PATHGEOM_BUILD_EXT=0"),
    # a compiler that exists but fails (C and C++ alike): the same pure-Python install
    "failing_compiler": ({"CXX": "/bin/false", "CC": "/bin/false"}, "the C++ compiler '/bin/false' failed on a test file"),
}


@pytest.mark.slow
@pytest.mark.parametrize("how", list(_INSTALLS))
def test_pure_python_install(tmp_path, how):
    """`PATHGEOM_BUILD_EXT=0 pip install .`, an install where no C++ compiler is found and one
    whose compiler fails: the pure-Python package, whose torch backend works and says (once)
    that it is the fallback, and whose --version says what runs."""
    if how == "failing_compiler" and not os.access("/bin/false", os.X_OK):
        pytest.skip("no /bin/false")
    src = copy_project(tmp_path)
    site = tmp_path / "site"
    install_env, reason = _INSTALLS[how]
    res = run([sys.executable, "-m", "pip", "install", "-v", "--no-deps", "--no-build-isolation", "--target", str(site), src],
              env=clean_env(**install_env))
    assert "without the compiled extension" in res.stderr + res.stdout
    assert not list(site.glob("pathgeom_fast/_C*"))
    probe = (
        "import torch, pathgeom_fast as pg; assert pg.__file__.startswith(%r), pg.__file__;"
        "assert not pg.extension_available(); print(pg.extension_error());"
        "torch.manual_seed(0);"
        "g, x, r = [torch.randn(300, 7), torch.randn(70000)], [torch.randn(300, 7), torch.randn(70000)], [torch.randn(2100), torch.randn(70000)];"
        "s = pg.secant_stats(g, x, r); assert pg.backend_for('cpu') == 'torch';"
        "pg.secant_stats(g, x, r, backend='torch');"
        # the DESIGN tolerance: |a - a*| <= 1e-6 sqrt(b c) (a is a sum of cancelling products), b and c relative
        "a, b, c = pg.reference_secant_stats(g, x, r).tolist();"
        "assert abs(s[0] - a) <= 1e-6 * (b * c) ** 0.5 and abs(s[1] - b) <= 1e-6 * b and abs(s[2] - c) <= 1e-6 * c, (s, a, b, c);"
        "print('stats ok')" % str(site)
    )
    res = run([sys.executable, "-c", probe], env=dict(clean_env(), PYTHONPATH=str(site)), cwd=tmp_path)
    assert reason in res.stdout and "stats ok" in res.stdout
    assert res.stderr.count("FallbackWarning: pathgeom_fast: compiled extension not loaded: using the torch fallback") == 1
    version = run([sys.executable, "-m", "pathgeom_fast.cli", "--version"], env=dict(clean_env(), PYTHONPATH=str(site)), cwd=tmp_path).stdout
    assert f"pathgeom_fast {pathgeom_fast.__version__}" in version and "extension: not loaded" in version
    assert "backend='auto' runs: torch on CPU tensors" in version and "fallback: CPU tensors run the torch backend" in version


@pytest.mark.slow
def _have_build() -> bool:  # a regular package, not a namespace made of some ./build directory
    spec = importlib.util.find_spec("build")
    return spec is not None and spec.origin is not None


@pytest.mark.skipif(not _have_build(), reason="the 'build' package is not installed (it is in the test extras)")
def test_python_m_build_makes_sdist_and_wheel(tmp_path):
    """`python -m build` (sdist, then the wheel from the sdist), pure-Python wheel."""
    src = copy_project(tmp_path)
    out = tmp_path / "dist"
    res = run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), src], env=clean_env(PATHGEOM_BUILD_EXT="0"), cwd=tmp_path)
    assert "Failed to initialize NumPy" not in res.stdout + res.stderr
    v = pathgeom_fast.__version__
    sdist = out / f"pathgeom_fast-{v}.tar.gz"
    wheel = out / f"pathgeom_fast-{v}-py3-none-any.whl"
    assert sdist.exists() and wheel.exists(), sorted(os.listdir(out))
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for f in ("setup.py", "pyproject.toml", "buildtools/pathgeom_build_backend.py", "buildtools/pathgeom_build_config.py",
              "csrc/secant_cuda.cu", "csrc/secant_core.h", "csrc/plan.cpp", "csrc/plan.h", "csrc/python_entry.cpp", "csrc/registration.cpp", "csrc/ops_cuda.cpp",
              "pathgeom_fast/ops/triton_stats.py", "pathgeom_fast/checkpoints/__init__.py"):
        assert f in names, f"{f} missing from the sdist"
    assert "pathgeom_fast/_build_info.py" not in names
    with zipfile.ZipFile(wheel) as zf:
        wnames = set(zf.namelist())
        info = zf.read("pathgeom_fast/_build_info.py").decode()
    for f in ("pathgeom_fast/__init__.py", "pathgeom_fast/ops/triton_plan.py", "pathgeom_fast/ops/triton_stats.py",
              "pathgeom_fast/ops/compile_check.py", "pathgeom_fast/compile_check.py", "pathgeom_fast/path/tracker.py",
              "pathgeom_fast/report/summary.py", "pathgeom_fast/cli/__main__.py", "pathgeom_fast/integrations/hf.py"):
        assert f in wnames
    assert not any(n.endswith((".so", ".pyd")) for n in wnames)
    assert "EXTENSION = False" in info


def test_version_flag():
    res = run([sys.executable, "-m", "pathgeom_fast.cli", "--version"], env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.stdout.startswith(f"pathgeom_fast {pathgeom_fast.__version__}\n")
    assert "torch " in res.stdout and "extension: " in res.stdout


def test_openmp_flags_are_tried_not_assumed(monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "buildtools"))
    try:
        import pathgeom_build_config as cfg
    finally:
        sys.path.pop(0)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert cfg.find_cxx() is None
    assert cfg.want_ext() == (False, "no C++ compiler found (CXX='/nonexistent/c++')")
    assert cfg.openmp_flags() == ([], [], ["no C++ compiler"])
    monkeypatch.setenv("CXX", sys.executable)  # exists, but is no compiler: every try fails
    flags, link, notes = cfg.openmp_flags()
    assert flags == [] and link == [] and "-fopenmp" in notes[0]
    build, why = cfg.want_ext()  # and the extension is not tried: the pure-Python install
    assert not build and why.startswith(f"the C++ compiler {sys.executable!r} failed on a test file")
    if os.access("/bin/false", os.X_OK):
        monkeypatch.setenv("CXX", "/bin/false")
        assert cfg.want_ext() == (False, "the C++ compiler '/bin/false' failed on a test file (exit status 1)")
        monkeypatch.setenv("PATHGEOM_BUILD_EXT", "1")  # required: an error, not a silent fallback
        with pytest.raises(SystemExit, match="PATHGEOM_BUILD_EXT=1 but the extension cannot be built: the C"):
            cfg.want_ext()
    monkeypatch.setenv("PATHGEOM_BUILD_EXT", "0")
    assert cfg.want_ext() == (False, "PATHGEOM_BUILD_EXT=0")


def _package_imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (at the top or inside functions)."""
    import ast

    root = os.path.dirname(pathgeom_fast.__file__)
    graph: dict[str, set[str]] = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
            if f == "__init__.py":
                name = package = name[: -len("__init__")].rstrip(".")  # "" for the package itself
            else:
                package = name.rpartition(".")[0]
            deps = graph.setdefault(name, set())
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.Import):
                    deps |= {a.name[len("pathgeom_fast."):] for a in node.names if a.name.startswith("pathgeom_fast.")}
                elif isinstance(node, ast.ImportFrom):
                    if node.level == 0:
                        if not (node.module or "").startswith("pathgeom_fast."):
                            continue
                        base = node.module[len("pathgeom_fast."):]
                    else:
                        parts = package.split(".") if package else []
                        parts = parts[: len(parts) - (node.level - 1)]
                        base = ".".join(parts + ([node.module] if node.module else []))
                    targets = [base] if node.module else [f"{base}.{a.name}".strip(".") for a in node.names]
                    deps |= {t for t in targets if t}
    # the package's __init__ (re-exports) is left out: importing a submodule runs it first anyway
    return {m: {d for d in deps if d in graph and d not in (m, "")} for m, deps in graph.items() if m}


def test_no_import_cycles_between_modules():
    """No module of the package imports, directly or through others, one that imports it back
    (lazy imports inside functions count too): the layering ops -> checkpoints -> path ->
    report -> cli goes one way."""
    graph = _package_imports()
    assert {"ops.wrappers", "ops.distributed", "path.tracker", "snapshots", "report.summary", "report.findings",
            "checkpoints.reference", "cli.commands", "integrations.common"} <= set(graph)
    assert "report.findings" in graph["report.summary"]  # the graph sees real edges

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for d in graph[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    cycles = sorted(m for m in graph if m in reach(m))
    assert not cycles, f"modules on an import cycle: {cycles}"


_OLD_PATHS = r'''
import importlib, json, sys
import pathgeom_fast
from pathgeom_fast._moved import MOVED
out = {}
for old, new in MOVED.items():
    a = importlib.import_module("pathgeom_fast." + old)  # the old path first, in a fresh process
    b = importlib.import_module("pathgeom_fast." + new)
    c = getattr(__import__("pathgeom_fast", fromlist=[old]), old)  # from pathgeom_fast import <old>
    out[old] = [a is b and c is b, a.__name__, a.__spec__.name, sys.modules["pathgeom_fast." + old] is b]
from pathgeom_fast import triton_kernels as tk
from pathgeom_fast.ops import triton_stats
tk.INTERPRET_WARPS = 3  # a global set through the old path is the one the kernels read
out["global"] = triton_stats.INTERPRET_WARPS
from pathgeom_fast.tracker import PathTracker, Reference, metrics, trainable
from pathgeom_fast.snapshots import SnapshotRecorder, analyze_snapshots, save_snapshot
from pathgeom_fast.checkpoints import open_checkpoint, open_run
from pathgeom_fast.ops import secant_stats
from pathgeom_fast import PathTracker as P2, Reference as R2, StepMeasurer
out["top"] = [P2 is PathTracker, R2 is Reference, secant_stats is pathgeom_fast.secant_stats]
print(json.dumps(out))
'''


def test_old_module_paths_are_the_moved_modules():
    """Code written for the flat layout (pathgeom_fast.tracker, pathgeom_fast.triton_kernels,
    ...) keeps working: each old path is the moved module itself, not a copy."""
    import json

    from pathgeom_fast._moved import MOVED

    res = run([sys.executable, "-c", _OLD_PATHS], env=dict(os.environ, PYTHONPATH=ROOT))
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for old, new in MOVED.items():
        assert out[old] == [True, f"pathgeom_fast.{new}", f"pathgeom_fast.{new}", True], old
    assert out["global"] == 3
    assert out["top"] == [True, True, True]
    # `python -m` on the old tool path and on the command line package
    res = run([sys.executable, "-m", "pathgeom_fast.compile_check", "--help"], env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.stdout.startswith("usage: python -m pathgeom_fast.compile_check")


def test_layout_rules():
    """The package's shape (issue 22): subpackages, few loose modules, every subpackage a
    regular package (setup.py's find_packages needs its __init__.py), and any module over 500
    lines says at its top why it is not split."""
    import ast

    root = os.path.dirname(pathgeom_fast.__file__)
    loose = sorted(f for f in os.listdir(root) if f.endswith(".py") and f != "__init__.py")
    assert len(loose) <= 8, loose
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and d != "__pycache__")
    assert {"ops", "path", "checkpoints", "report", "cli", "integrations"} <= set(folders), folders
    long = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        if folder != root:
            assert "__init__.py" in files, f"{folder} is not a regular package"
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                src = open(path).read()
                doc = ast.get_docstring(ast.parse(src)) or ""
                if src.count("\n") > 500 and "500 lines" not in doc:
                    long.append(os.path.relpath(path, root))
    assert not long, f"over 500 lines without a reason at the top: {long}"
