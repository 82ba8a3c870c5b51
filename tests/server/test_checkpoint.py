"""Checkpoints: atomic, exact round trip, identical bytes for identical state, clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from fedge.server.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    CheckpointError,
    checkpoint_bytes,
    load_checkpoint,
    save_checkpoint,
)


def _ckpt() -> Checkpoint:
    rng = np.random.default_rng(0)
    model = {"conv.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "a.bias": np.arange(3.0)}
    components = {
        "strategy": {"m_t@dict/00000/conv.weight": np.ones(2)},
        "loop": {"last-round": np.asarray(3)},
        "accountant": {},
    }
    return Checkpoint(3, model, components, {"num-rounds": 5, "lr": 0.1}, [{"round": 1, "b": 2, "a": 1}])


def test_round_trip_is_exact(tmp_path: Path) -> None:
    ckpt = _ckpt()
    save_checkpoint(tmp_path, ckpt)
    back = load_checkpoint(tmp_path)
    assert back.server_round == 3 and back.config == ckpt.config and back.history == ckpt.history
    assert list(back.model) == ["conv.weight", "a.bias"]  # the model's own order survives
    for k, v in ckpt.model.items():
        np.testing.assert_array_equal(back.model[k], v)
    assert sorted(back.components) == ["accountant", "loop", "strategy"]  # an empty one too
    np.testing.assert_array_equal(back.strategy_state["m_t@dict/00000/conv.weight"], np.ones(2))
    assert int(back.components["loop"]["last-round"]) == 3
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_identical_saves_give_identical_bytes() -> None:
    # safetensors writes its metadata map in a random order; fedge's one JSON entry does not.
    first = checkpoint_bytes(_ckpt())
    assert all(checkpoint_bytes(_ckpt()) == first for _ in range(20))
    header_len = int.from_bytes(first[:8], "little")
    header = json.loads(first[8 : 8 + header_len])
    assert list(header["__metadata__"]) == ["fedge"]


def test_format_1_checkpoints_still_load(tmp_path: Path) -> None:
    metadata = {
        "format": "fedge-checkpoint/1",
        "server_round": "2",
        "config": json.dumps({"strategy": "fedavgm"}),
        "history": json.dumps([{"round": 1}, {"round": 2}]),
        "model_keys": json.dumps(["w"]),
    }
    tensors = {"model/w": np.ones(3, np.float32), "strategy/momentum_vector/#0": np.full(3, 0.5)}
    (tmp_path / CHECKPOINT_FILE).write_bytes(save(tensors, metadata=metadata))
    back = load_checkpoint(tmp_path)
    assert back.server_round == 2 and back.config == {"strategy": "fedavgm"}
    np.testing.assert_array_equal(back.strategy_state["momentum_vector@list/00000"], np.full(3, 0.5))


def test_missing_and_corrupt_checkpoints_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    assert "\n" not in str(err.value)
