"""Checkpoints: atomic, exact round trip, refusals with a clear message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedge.server.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint


def test_round_trip_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    model = {"conv.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "a.bias": np.arange(3.0)}
    ckpt = Checkpoint(3, model, {"m_t/conv.weight": np.ones(2)}, {"num-rounds": 5}, [{"round": 1}])
    save_checkpoint(tmp_path, ckpt)
    back = load_checkpoint(tmp_path)
    assert back.server_round == 3 and back.config == {"num-rounds": 5} and back.history == [{"round": 1}]
    assert list(back.model) == ["conv.weight", "a.bias"]  # the model's own order survives
    for k, v in model.items():
        np.testing.assert_array_equal(back.model[k], v)
    np.testing.assert_array_equal(back.strategy_state["m_t/conv.weight"], np.ones(2))
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_missing_and_corrupt_checkpoints_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    assert "\n" not in str(err.value)
