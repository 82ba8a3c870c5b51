"""Benchmark: compressed client updates (issue 4).

Trains FEMNIST with the natural writer split (100 writers, 20 a round, 30 rounds, cnn28)
once per codec on fedge's in-process engine, same seed, and prints per codec: bits per
parameter and bytes per client-round as counted on the wire (Flower's protobuf
serialization of each reply), the ratio to the uncompressed run, the final accuracy and
its distance from the uncompressed run's, and the codec's encode and decode throughput on
a 1M-parameter update on one core.

    make bench                                   # or: python benchmarks/compression.py
    python benchmarks/compression.py --codecs none qsgd:2 topk:0.01+ef
    python benchmarks/compression.py --throughput-only
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedge.compression import decode, encode, parse_codec
from fedge.config import RunConfig
from fedge.simulation.runner import simulate

WORKLOAD = {
    "dataset": "femnist",
    "partition": "natural",
    "model": "cnn28",
    "num-clients": 100,
    "clients-per-round": 20,
    "num-rounds": 30,
    "local-epochs": 2,
    "batch-size": 16,
    "lr": 0.05,
    "seed": 42,
    "export-every": "off",
}
# "+ef" turns on error feedback.
CODECS = ("none", "qsgd:8", "qsgd:4", "qsgd:2", "rotate+qsgd:2", "qsgd:1+ef", "topk:0.01+ef", "topk:0.03")
THROUGHPUT_ELEMENTS = 1_000_000


def _split(text: str) -> tuple[str, bool]:
    codec, _, flag = text.partition("+ef")
    return codec, text.endswith("+ef") and not flag


def train(text: str, out: Path, rounds: int) -> dict[str, Any]:
    """One FEMNIST run with ``text``'s codec; wire figures and accuracy."""
    codec, error_feedback = _split(text)
    values = {**WORKLOAD, "compression": codec, "error-feedback": error_feedback, "num-rounds": rounds}
    cfg = RunConfig.from_mapping(values)
    summary = simulate(cfg, out / text.replace(":", "-").replace("+", "_"))
    history = summary["history"]
    replies = sum(r["clients"] for r in history)
    bytes_up = sum(r["bytes_up"] for r in history)
    accuracies = [r["accuracy"] for r in history]
    return {
        "bytes_per_client_round": round(bytes_up / replies),
        "final_accuracy": round(summary["final"]["accuracy"], 4),
        "mean_accuracy_last5": round(float(np.mean(accuracies[-5:])), 4),
        "wall_s": round(summary["wall_s"], 1),
    }


def throughput(text: str, repeats: int = 5) -> dict[str, float]:
    """Encode and decode MB/s of fp32 input, 1M elements, one core (best of ``repeats``)."""
    from threadpoolctl import threadpool_limits

    codec, _ = _split(text)
    spec = parse_codec(codec)
    x = np.random.default_rng(0).standard_normal(THROUGHPUT_ELEMENTS).astype(np.float32)
    rng = np.random.default_rng(1)
    best_encode = best_decode = math.inf
    with threadpool_limits(limits=1):
        for _ in range(repeats):
            start = time.perf_counter()
            payload = encode(x, spec, rng, rotation_seed=7)
            middle = time.perf_counter()
            decode(payload, x.shape)
            end = time.perf_counter()
            best_encode = min(best_encode, middle - start)
            best_decode = min(best_decode, end - middle)
    megabytes = x.nbytes / 1e6
    return {
        "encode_mb_s": round(megabytes / best_encode),
        "decode_mb_s": round(megabytes / best_decode),
        "encode_decode_mb_s": round(megabytes / (best_encode + best_decode)),
        "payload_bits_per_param": round(8 * len(payload) / x.size, 3),
    }


def main() -> None:
    """Run the codecs and print one JSON object (and a Markdown table on stderr)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), help="codecs; '+ef': error feedback")
    parser.add_argument("--rounds", type=int, default=WORKLOAD["num-rounds"])
    parser.add_argument("--throughput-only", action="store_true")
    args = parser.parse_args()
    if not args.throughput_only and not os.environ.get("FEDGE_DATA_DIR"):
        raise SystemExit("set FEDGE_DATA_DIR to the shared datasets folder (make bench does)")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    codecs = list(args.codecs)
    if not args.throughput_only and "none" not in codecs:
        codecs.insert(0, "none")
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for text in codecs:
            row: dict[str, Any] = {}
            if not args.throughput_only:
                row.update(train(text, Path(tmp), args.rounds))
            row.update(throughput(text))
            rows[text] = row
    if not args.throughput_only:
        base = rows["none"]
        cfg = RunConfig.from_mapping(WORKLOAD)
        params = sum(p.numel() for p in cfg.build_model(cfg.federated_data().spec).parameters())
        for row in rows.values():
            row["bits_per_param"] = round(8 * row["bytes_per_client_round"] / params, 3)
            row["uplink_ratio"] = round(row["bytes_per_client_round"] / base["bytes_per_client_round"], 4)
            row["accuracy_delta_points"] = round(100 * (row["final_accuracy"] - base["final_accuracy"]), 2)
    print(json.dumps({"workload": WORKLOAD, "codecs": rows}, indent=2))


if __name__ == "__main__":
    main()
