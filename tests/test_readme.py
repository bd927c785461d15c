"""The README's ops example runs as written (each code block alone, in a fresh directory)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def section_blocks(title: str) -> list[str]:
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n### ", start)  # the section's own text, before its first subsection
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_readme_ops_example_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = section_blocks("The ops")
    assert len(blocks) == 2 and "pg.secant_stats(pg.grads_of(model), model, xstar)" in blocks[1]
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(blocks):  # each block stands alone, as a reader would paste it
        exec(compile(block, f"README.md (ops block {i})", "exec"), {"__name__": "__main__"})
    cos = float(re.search(r"tensor\(([-0-9.e]+)", capsys.readouterr().out).group(1))
    assert 0 < cos < 1  # what the README's comment says
