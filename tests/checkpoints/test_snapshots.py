import pytest
import torch

from pathgeom_fast.snapshots import SnapshotRecorder, list_snapshots, load_snapshot, save_snapshot
from pathgeom_fast.tracker import Reference


def test_roundtrip_and_listing(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    rec = SnapshotRecorder(model, str(tmp_path), every=5)
    for step in range(12):
        with torch.no_grad():
            model.weight.add_(0.1)
        rec.maybe_save(step, lr=0.5)
    assert [s for s, _ in list_snapshots(str(tmp_path))] == [0, 5, 10]
    tensors, meta = load_snapshot(list_snapshots(str(tmp_path))[-1][1])
    assert meta == {"step": "10", "lr": "0.5"}
    assert set(tensors) == {"weight", "bias"}
    ref = Reference.from_file(model, list_snapshots(str(tmp_path))[0][1])
    assert torch.allclose(ref.tensors[0], model.weight.detach() - 1.1, atol=1e-6)  # 11 float32 additions apart
    rec.finish(12, lr=0.25)  # the final point is always saved
    assert [s for s, _ in list_snapshots(str(tmp_path))] == [0, 5, 10, 12]
    assert torch.equal(load_snapshot(list_snapshots(str(tmp_path))[-1][1])[0]["weight"], model.weight.detach())
    rec.finish(12)  # not twice
    assert rec.saved == [0, 5, 10, 12]


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "step_00000001.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    with pytest.raises(ValueError, match=r"step_00000001.safetensors is not a readable safetensors file"):
        load_snapshot(str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_snapshot(str(tmp_path / "nope.safetensors"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no step_"):
        list_snapshots(str(empty))


def test_reference_file_with_wrong_keys(tmp_path):
    model = torch.nn.Linear(4, 3)
    path = str(tmp_path / "x.safetensors")
    save_snapshot(torch.nn.Linear(4, 2), path, 0)
    with pytest.raises(ValueError, match=r"reference file .*'weight' has shape \[2, 4\] but the model's parameter has \[3, 4\]"):
        Reference.from_file(model, path)
