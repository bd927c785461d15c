"""Sharded inputs with torch.distributed (gloo, CPU processes): DESIGN.md section 3."""

import pytest

import dist_workers as W

pytestmark = pytest.mark.distributed


def test_dtensor_1d_mesh_uneven_and_empty_shards():
    W.launch(W.dtensor_1d, 2)


def test_plain_shards_with_group():
    W.launch(W.plain_group, 3)


def test_dtensor_2d_mesh_replicated_dims_not_counted_twice():
    W.launch(W.dtensor_2d, 4)


def test_fsdp2_tracker_matches_single_process(tmp_path):
    W.launch(W.fsdp_tracker, 2, str(tmp_path))
