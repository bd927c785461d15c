"""summary.json holds the primary reference's blocks once; every reader gets them back."""

import copy
import json
import math
import random

from pathgeom_fast import report
from pathgeom_fast.findings import findings_markdown, reference_block


def _records(seed=0, steps=40, refs=("xstar", "x0", "xstar_seed1")):
    """Rows as the tracker writes them: random (a, b, c) per step, kind, sample and reference,
    with the ratios computed from them."""
    rnd = random.Random(seed)
    rows = []
    for ref_i, ref in enumerate(refs):
        for step in range(steps):
            c = (1.0 + ref_i) * 0.97 ** step + 1e-3
            for kind, samples in (("minibatch", 1), ("probe", 3), ("full", 1)):
                for sample in range(samples):
                    b = rnd.uniform(0.5, 2.0)
                    a = rnd.uniform(0.1, 0.9) * math.sqrt(b * c)
                    m = {"rsi": a / c, "eb": math.sqrt(b / c), "cos": a / math.sqrt(b * c), "eta_star": a / b}
                    rows.append({"step": step, "kind": kind, "sample": sample, "reference": ref,
                                 "lr": 0.1, "loss": rnd.random(), "a": a, "b": b, "c": c, **m})
    return rows


def test_summary_stores_the_primary_reference_once_and_readers_see_it(tmp_path):
    records = _records()
    summary = report.write_report(str(tmp_path), records, numel=1000, findings=True)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert list(on_disk["by_reference"]) == ["xstar", "x0", "xstar_seed1"]  # every reference, in order
    assert on_disk["by_reference"]["xstar"] == {"at_top_level": True}
    for name in ("x0", "xstar_seed1"):
        assert set(on_disk["by_reference"][name]) == {"overall", "steps", "path"}
    # the blocks read back are those computed for each reference alone
    for name in ("xstar", "x0", "xstar_seed1"):
        alone = report.summarize([r for r in records if r["reference"] == name], 1000)
        got = reference_block(on_disk, name)
        for key in ("overall", "steps", "path"):
            assert json.loads(json.dumps(got[key])) == json.loads(json.dumps(alone[key])), (name, key)
    assert reference_block(on_disk, "nowhere") == {"overall": {}, "steps": {}, "path": {}}

    # the table and findings.md read the single copy as they read the old duplicated form
    doubled = copy.deepcopy(on_disk)
    doubled["by_reference"]["xstar"] = {k: on_disk[k] for k in ("overall", "steps", "path")}
    assert report.format_table(on_disk) == report.format_table(doubled)
    assert findings_markdown(on_disk, "t") == findings_markdown(doubled, "t")
    assert (tmp_path / "findings.md").read_text() == findings_markdown(summary, "")
    assert "against reference 'x0':" in report.format_table(on_disk)
    # one copy fewer: the file is smaller than the doubled one by about the primary's share
    size, doubled_size = len(json.dumps(on_disk, indent=1)), len(json.dumps(doubled, indent=1))
    assert size < 0.8 * doubled_size, (size, doubled_size)


def test_summary_of_one_reference_and_of_a_summary_without_by_reference():
    records = _records(refs=("xstar",))
    summary = json.loads(json.dumps(report.summarize(records, 1000)))
    assert summary["by_reference"] == {"xstar": {"at_top_level": True}}
    assert reference_block(summary, "xstar")["overall"] == summary["overall"]
    legacy = {k: v for k, v in summary.items() if k != "by_reference"}
    assert report.format_table(legacy) == report.format_table(summary)


def test_rows_at_the_reference_do_not_make_mu_and_l_undefined():
    """A row with c = 0 (x_0 measured against the x_0 reference at step 0) has EB = inf and an
    RSI of +-inf: mu and L are taken over the other rows, as the quantiles are, and the row is
    counted in n_undefined."""
    rows = [r for r in _records(refs=("x0",), steps=6) if r["kind"] == "minibatch"]
    at_ref = dict(rows[0], a=-1.8e-11, c=0.0, rsi=-math.inf, eb=math.inf, cos=-math.inf, eta_star=rows[0]["a"] / rows[0]["b"])
    block = report.summarize([at_ref] + rows[1:], 1000, tail_fraction=0)["overall"]["minibatch"]
    finite = rows[1:]
    assert block["n"] == 6 and block["n_undefined"] == 1
    assert block["mu"] == min(r["rsi"] for r in finite) and block["L"] == max(r["eb"] for r in finite)
    assert block["rate"] == 1 - block["mu"] ** 2 / block["L"] ** 2
    assert report.summarize(rows, 1000, tail_fraction=0)["overall"]["minibatch"]["n_undefined"] == 0
