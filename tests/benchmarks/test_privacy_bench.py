"""benchmarks/privacy.py at its --quick size: the non-private run, central DP and DP-SGD at
epsilon 8 all run, and the report has its figures."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_privacy_benchmark_quick(capsys) -> None:  # type: ignore[no-untyped-def]
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    bench = importlib.import_module("privacy")
    bench.main(["--quick"])
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"workload", "delta", "parameters", "rows", "epsilon_8_within_3_points"}
    assert report["delta"] == 1e-5
    rows = {(r["mechanism"], r["target_epsilon"]): r for r in report["rows"]}
    assert set(rows) == {("none", None), ("central", 8.0), ("dp-sgd", 8.0)}
    for r in rows.values():
        for key in (
            "final_accuracy",
            "epsilon",
            "noise_multiplier",
            "bits_per_param_up",
            "accuracy_delta_points",
        ):
            assert key in r, key
        assert 0 <= r["final_accuracy"] <= 1
        assert r["bits_per_param_up"] > 0
    assert rows[("none", None)]["epsilon"] is None
    for mechanism in ("central", "dp-sgd"):
        r = rows[(mechanism, 8.0)]
        assert r["noise_multiplier"] > 0
        assert 0 < r["epsilon"] <= 8.0
        assert set(report["epsilon_8_within_3_points"][mechanism]) >= {"met", "accuracy_delta_points", "took"}
