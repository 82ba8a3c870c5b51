"""Benchmark: fedge's in-process engine against Flower's Ray engine on one workload.

The reference workload (issue 2): MNIST, 100 clients, Dirichlet 0.5, cnn28, 3 rounds,
all clients every round, 1 local epoch, batch 32; same seed, same number of cores.
Each engine runs as its own `fedge simulate` process, timed end to end (start-up,
Ray's included). Prints one JSON object.

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


def run_engine(engine: str, rounds: int, workers: int, out: Path) -> dict[str, object]:
    """Run one `fedge simulate` process; return its wall time and summary figures."""
    exe = Path(sys.executable).with_name("fedge")
    args = [
        str(exe),
        "simulate",
        "--quiet",
        "--engine",
        engine,
        "--num-rounds",
        str(rounds),
        "--workers",
        str(workers),
        "--out",
        str(out),
    ]
    for key, value in WORKLOAD.items():
        args += [f"--{key}", value]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    wall_s = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{engine} run failed with exit status {proc.returncode}")
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": wall_s, "accuracy": summary["final"]["accuracy"]}


def main() -> None:
    """Run both engines and print the comparison as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    if not os.environ.get("FEDGE_DATA_DIR"):
        raise SystemExit("set FEDGE_DATA_DIR to the shared datasets folder (make bench does)")
    with tempfile.TemporaryDirectory() as tmp:
        inprocess = run_engine("inprocess", args.rounds, args.workers, Path(tmp) / "inprocess")
        ray = run_engine("ray", args.rounds, args.workers, Path(tmp) / "ray")
    print(
        json.dumps(
            {
                "workload": {**WORKLOAD, "num-rounds": args.rounds, "workers": args.workers},
                "inprocess_s": round(float(inprocess["wall_s"]), 2),
                "ray_s": round(float(ray["wall_s"]), 2),
                "speedup": round(float(ray["wall_s"]) / float(inprocess["wall_s"]), 2),
                "accuracy_inprocess": inprocess["accuracy"],
                "accuracy_ray": ray["accuracy"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
