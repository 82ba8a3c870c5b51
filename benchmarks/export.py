"""Benchmark: the int8 export of a trained global model (issue 3).

Trains with fedge's own round loop, exports the final round through the server's
export hook (fp32 ONNX -> static int8 QDQ calibrated on 256 server-side training
images -> ONNX Runtime accuracy on the test split and latency at 1 thread, batch 1 ->
gate -> sign -> publish) and prints, per dataset: model sizes and their ratio,
accuracy of both models, p50 latency of both and their ratio, and the hook's time.

    make bench            # or: python benchmarks/export.py
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from fedge.config import RunConfig
from fedge.simulation.runner import simulate

WORKLOADS = {
    # FEMNIST's natural split: one client per writer, 100 writers, 62 classes.
    "femnist": {
        "dataset": "femnist",
        "partition": "natural",
        "num-clients": 100,
        "clients-per-round": 20,
        "num-rounds": 30,
        "local-epochs": 2,
        "batch-size": 16,
        "lr": 0.05,
    },
    "mnist": {
        "dataset": "mnist",
        "partition": "dirichlet:0.5",
        "num-clients": 100,
        "clients-per-round": 20,
        "num-rounds": 10,
        "local-epochs": 1,
        "batch-size": 32,
        "lr": 0.05,
    },
}


def run(name: str, values: dict[str, object], out: Path) -> dict[str, object]:
    """Train one workload, export its final round, return the figures."""
    cfg = RunConfig.from_mapping({**values, "model": "cnn28", "export-every": "final", "seed": 42})
    summary = simulate(cfg, out / name)
    (entry,) = summary["artifacts"]
    return {
        "rounds": cfg.num_rounds,
        "fp32_bytes": entry["fp32_bytes"],
        "int8_bytes": entry["int8_bytes"],
        "size_ratio": round(entry["int8_bytes"] / entry["fp32_bytes"], 3),
        "accuracy_fp32": round(entry["accuracy_fp32"], 4),
        "accuracy_int8": round(entry["accuracy_int8"], 4),
        "accuracy_delta_points": round(100 * (entry["accuracy_int8"] - entry["accuracy_fp32"]), 2),
        "latency_ms_p50_fp32": round(entry["latency_ms_p50_fp32"], 4),
        "latency_ms_p50_int8": round(entry["latency_ms_p50_int8"], 4),
        "latency_p50_ratio": round(entry["latency_ms_p50_int8"] / entry["latency_ms_p50_fp32"], 2),
        "export_hook_s": round(entry["export_s"], 2),
        "published": entry["published"],
    }


def main() -> None:
    """Run every workload and print one JSON object."""
    if not os.environ.get("FEDGE_DATA_DIR"):
        raise SystemExit("set FEDGE_DATA_DIR to the shared datasets folder (make bench does)")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # one line per configure/aggregate call
    with tempfile.TemporaryDirectory() as tmp:
        report = {name: run(name, values, Path(tmp)) for name, values in WORKLOADS.items()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
