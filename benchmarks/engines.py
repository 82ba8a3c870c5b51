"""Benchmark: fedge's in-process engine against Flower's Ray engine.

Two workloads, each run on both engines, one after the other, with the same seed and
the same number of cores. The reference workload (issue 2): MNIST, 100 clients,
Dirichlet 0.5, cnn28, 3 rounds, all clients every round, 1 local epoch, batch 32
(few, heavy clients). The default workload: `fedge simulate` with no arguments (many
light clients). Each run is its own `fedge simulate` process, timed end to end
(start-up, Ray's included). Prints one JSON object.

    make bench            # or: python benchmarks/engines.py [--rounds 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKLOAD = {
    "dataset": "mnist",
    "partition": "dirichlet:0.5",
    "model": "cnn28",
    "num-clients": "100",
    "clients-per-round": "100",
    "local-epochs": "1",
    "batch-size": "32",
    "lr": "0.05",
    "seed": "42",
}


# `fedge simulate`'s defaults: many light clients (about 29 digits each), 20 rounds.
DEFAULT_WORKLOAD: dict[str, str] = {}


def run_engine(
    engine: str, workload: dict[str, str], rounds: int | None, workers: int, out: Path
) -> tuple[float, float]:
    """Run one `fedge simulate` process; return its wall time (s) and final accuracy."""
    exe = Path(sys.executable).with_name("fedge")
    args = [str(exe), "simulate", "--quiet", "--engine", engine, "--workers", str(workers), "--out", str(out)]
    if rounds is not None:
        args += ["--num-rounds", str(rounds)]
    for key, value in workload.items():
        args += [f"--{key}", value]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    wall_s = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{engine} run failed with exit status {proc.returncode}")
    summary = json.loads((out / "summary.json").read_text())
    return wall_s, float(summary["final"]["accuracy"])


def compare(workload: dict[str, str], rounds: int | None, workers: int, tmp: Path) -> dict[str, float]:
    """Both engines on one workload, one after the other, same seed and cores."""
    ours_s, ours_acc = run_engine("inprocess", workload, rounds, workers, tmp / "inprocess")
    ray_s, ray_acc = run_engine("ray", workload, rounds, workers, tmp / "ray")
    return {
        "inprocess_s": round(ours_s, 2),
        "ray_s": round(ray_s, 2),
        "speedup": round(ray_s / ours_s, 2),
        "accuracy_inprocess": ours_acc,
        "accuracy_ray": ray_acc,
    }


def main() -> None:
    """Run both engines on both workloads and print the comparison as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    if not os.environ.get("FEDGE_DATA_DIR"):
        raise SystemExit("set FEDGE_DATA_DIR to the shared datasets folder (make bench does)")
    with tempfile.TemporaryDirectory() as tmp:
        reference = compare(WORKLOAD, args.rounds, args.workers, Path(tmp) / "reference")
        default = compare(DEFAULT_WORKLOAD, None, args.workers, Path(tmp) / "default")
    report = {
        "workload": {**WORKLOAD, "num-rounds": args.rounds, "workers": args.workers},
        **reference,
        "default_workload": {
            "workload": "fedge simulate defaults (digits, 50 clients, 20 rounds)",
            **default,
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
