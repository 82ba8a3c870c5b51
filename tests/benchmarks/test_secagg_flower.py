"""benchmarks/secagg_flower.py at its --quick size: Flower's SecAgg+ runs to the end and the
figures are there and positive."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_flower_secaggplus_quick() -> None:
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    bench = importlib.import_module("secagg_flower")
    result = bench.flower_secaggplus(num_clients=10, num_params=100_000, drop_fraction=0.1, seed=0)
    json.dumps(result)  # JSON-able
    assert result["dropped"] == 1
    for key in (
        "uplink_bytes_per_client",
        "downlink_bytes_per_client",
        "bytes_per_param_masked_vector",
        "client_mask_s",
        "server_unmask_s",
        "round_s",
        "plain_round_s",
        "overhead",
    ):
        assert isinstance(result[key], float) and result[key] > 0, key
    stages = {"setup", "share_keys", "collect_masked_vectors", "unmask"}
    assert set(result["uplink_bytes_per_stage"]) == stages
    assert set(result["downlink_bytes_per_stage"]) == stages
    assert all(v > 0 for v in result["uplink_bytes_per_stage"].values())
    # Flower sends the masked vector as int64.
    assert 8.0 <= result["bytes_per_param_masked_vector"] < 8.1
    # The unmasked average is the clients' mean up to 8-bit quantization of [-0.5, 0.5].
    assert result["max_abs_error"] < 1 / 256
