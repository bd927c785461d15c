"""Every code block of README.md and docs/*.md runs as a reader would paste it.

Each page gets a fresh working directory; its blocks run there in page order, each in its own
process, so "run 1" and "run 2" blocks are two separate scripts that share only the files they
write. What a block is:

* ```python whose first line is ``# file: NAME.py``: saved as NAME.py in that directory (the
  page asks the reader to save it; later blocks import it). Any other ```python block is saved
  and run with ``python``; it must exit with status 0.
* ```bash: each command (``\\``-continued lines joined, comments dropped) runs with bash, the
  package's environment first on PATH. ``make TARGET`` runs as ``make -n TARGET`` in the
  checkout (the test must not call itself; the dry run checks the target and its recipe) and
  ``pip install ...`` as ``pip install --dry-run ...`` in the checkout (it resolves the extras
  and reads the package's metadata without changing the environment the tests run in).
* ```text: output or a listing, not run.

An HTML comment before a block (invisible on the rendered page) may say
``<!-- docs-test: needs cuda -->`` (not run, with a warning naming it, on a machine without a GPU) or
``<!-- docs-test: needs NAME -->`` for an optional package; a page may say
``<!-- docs-test: fixture analyze -->`` once, to get the placeholders its commands name
(``mymodels.py``, ``mydata.py`` and small runs written by the real libraries).
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
FENCE = re.compile(r"(?:<!-- docs-test: ([^>]*) -->\s*\n)?```([a-z]*)\n(.*?)```", re.S)
KINDS = {"python", "bash", "text"}


def blocks(page: str) -> list[tuple[str, str, str]]:
    """(kind, directive, code) of every fenced block of the page, in order."""
    text = open(os.path.join(ROOT, page)).read()
    return [(m.group(2), (m.group(1) or "").strip(), m.group(3)) for m in FENCE.finditer(text)]


def page_fixtures(page: str) -> set[str]:
    text = open(os.path.join(ROOT, page)).read()
    return set(re.findall(r"<!-- docs-test: fixture (\w+) -->", text))


def commands(code: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [".", e.get("PYTHONPATH", "")]))
    e.setdefault("HF_HUB_OFFLINE", "1")
    e["MPLBACKEND"] = "Agg"
    return e


def run(cmd, cwd, what: str, timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout,
                         shell=isinstance(cmd, str), executable="/bin/bash" if isinstance(cmd, str) else None)
    assert res.returncode == 0, f"{what} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def shell_command(line: str, cwd: str) -> tuple[str, str]:
    """The command to run for one documented shell line, and where."""
    words = shlex.split(line, comments=True)
    line = " ".join(shlex.quote(w) for w in words)
    if words[0] == "make":
        return "make -n " + " ".join(shlex.quote(w) for w in words[1:]), ROOT
    if "pip" in words and "install" in words:
        i = words.index("install")
        pip = [sys.executable, "-m", "pip"]
        prefix = words[: words.index("pip")]  # environment assignments such as PATHGEOM_BUILD_EXT=0
        rest = words[i + 1 :]
        return " ".join(shlex.quote(w) for w in prefix + pip + ["install", "--dry-run", "-q"] + rest), ROOT
    return line, cwd


def skip_reason(directive: str) -> str | None:
    m = re.match(r"needs (\S+)", directive)
    if not m:
        return None
    what = m.group(1)
    if what == "cuda":
        import torch

        return None if torch.cuda.is_available() else "needs a CUDA device"
    try:
        __import__(what)
    except ImportError:
        return f"needs {what}"
    return None


def test_every_block_has_a_known_kind():
    for page in PAGES:
        for kind, directive, code in blocks(page):
            assert kind in KINDS, f"{page}: a ```{kind} block (use python, bash or text):\n{code[:200]}"
            assert not directive or directive.startswith(("needs ", "fixture ")), f"{page}: {directive}"


def test_no_broken_links():
    for page in PAGES:
        text = open(os.path.join(ROOT, page)).read()
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), target))
            assert os.path.exists(path), f"{page}: link to {target}, which does not exist"


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_page_blocks_run_as_written(page, tmp_path):
    bs = blocks(page)
    if not any(kind in ("python", "bash") for kind, _, _ in bs):
        pytest.skip(f"{page} has no code to run")
    cwd = str(tmp_path)
    for name in page_fixtures(page):
        import docs_fixtures

        getattr(docs_fixtures, name)(cwd)
    skipped = []
    for n, (kind, directive, code) in enumerate(bs):
        reason = skip_reason(directive)
        if reason:
            skipped.append(f"block {n}: {reason}")
            continue
        if kind == "python":
            first = code.splitlines()[0] if code.strip() else ""
            m = re.match(r"# file: (\S+\.py)\s*$", first)
            path = os.path.join(cwd, m.group(1) if m else f"block_{n}.py")
            with open(path, "w") as f:
                f.write(code)
            if not m:
                run([sys.executable, path], cwd, f"{page} python block {n}")
        elif kind == "bash":
            for line in commands(code):
                cmd, where = shell_command(line, cwd)
                run(cmd, where, f"{page} bash block {n}: {line}")
    if skipped:  # the rest of the page ran: say what did not, without hiding the pass
        warnings.warn(f"{page}: " + "; ".join(skipped), UserWarning)
