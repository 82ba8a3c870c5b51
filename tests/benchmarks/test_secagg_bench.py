"""benchmarks/secagg.py at its --quick size: fedge's SecAgg+ protocol, its rounds on fedge's engine
and Flower's SecAgg+ all run, and the report has its figures."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_secagg_benchmark_quick(capsys) -> None:  # type: ignore[no-untyped-def]
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    bench = importlib.import_module("secagg")
    bench.main(["--quick"])
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"cohort", "fedge_protocol", "fedge_rounds", "flower", "ratios", "targets_met"}
    assert "accuracy" not in report  # --quick leaves the MNIST section out

    protocol = report["fedge_protocol"]
    assert protocol["sum_exact"] is True
    assert protocol["dropped"] == 1
    for key in ("client_mask_s", "server_unmask_s", "masked_bytes_per_param"):
        assert protocol[key] > 0, key

    rounds = report["fedge_rounds"]
    assert set(rounds) == {"plain", "secagg-8bit", "secagg-rotate+qsgd:4"}
    assert set(rounds["plain"]["uplink_bytes_per_stage"]) == {"train"}
    for name in ("secagg-8bit", "secagg-rotate+qsgd:4"):
        r = rounds[name]
        assert set(r["uplink_bytes_per_stage"]) == {"advertise-keys", "share-keys", "masked-input", "unmask"}
        assert r["dropped_per_stage"] == {"after-share-keys": 1}
        assert r["finished_clients"] == 9
        assert r["round_s"] > 0 and r["overhead_vs_plain"] > 0
        # The secure model is the plain one up to the quantization of [-0.5, 0.5].
        assert r["max_abs_diff_vs_plain_model"] < 0.5
    # 10 clients at 8 bits: 12-bit field elements, 1.5 bytes per parameter.
    assert 1.5 <= rounds["secagg-8bit"]["masked_bytes_per_param"] < 1.51
    assert (
        rounds["secagg-rotate+qsgd:4"]["uplink_bytes_per_client"]
        < rounds["secagg-8bit"]["uplink_bytes_per_client"]
    )

    ratios = report["ratios"]
    assert 0 < ratios["secagg-8bit"]["uplink_vs_flower"] < 0.25
    assert report["flower"]["dropped"] == 1
    assert set(report["targets_met"]) >= {
        "uplink_ratio_vs_flower",
        "masked_bytes_per_param",
        "client_mask_s",
        "server_unmask_s",
        "round_overhead",
    }
