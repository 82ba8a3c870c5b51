"""Benchmark: compressed client updates (issue 4).

Trains FEMNIST with the natural writer split (100 writers, 20 a round, 30 rounds, cnn28)
once per codec and seed (42, 43, 44) on fedge's in-process engine, and prints per codec:
bits per parameter and bytes up and down per client-round as counted on the wire (Flower's protobuf
serialization of each reply), the ratio to the uncompressed run, the final accuracy (mean
over seeds) and its distance from the uncompressed run's (mean of the per-seed
differences), and the codec's encode and decode throughput on a 1M-parameter update on one
core (best of 5). JSON on stdout, a Markdown table on stderr.

    make bench                                   # or: python benchmarks/compression.py
    python benchmarks/compression.py --codecs qsgd:2 stc:0.1+ef+fp16 --seeds 42   # +ef, +fp16
    python benchmarks/compression.py --throughput-only
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from export import WORKLOADS

from fedge.compression import decode, encode, parse_codec
from fedge.config import RunConfig
from fedge.simulation.runner import simulate

# The export benchmark's FEMNIST workload (natural split, 100 writers, 20 a round, 30 rounds).
WORKLOAD = {**WORKLOADS["femnist"], "model": "cnn28", "seed": 42, "export-every": "off"}
# "+ef" turns on error feedback.
CODECS = (
    "none",
    "qsgd:4",
    "qsgd:2",
    "rotate+qsgd:2",
    "ternary",
    "rotate+ternary",
    "topk:0.01+ef",
    "stc:0.1",
    "stc:0.1+ef",
    "stc:0.1+ef+fp16",
    "stc:0.05+ef",
)
SEEDS = (42, 43, 44)
THROUGHPUT_ELEMENTS = 1_000_000


def _split(text: str) -> tuple[str, bool, str]:
    """``"stc:0.1+ef+fp16"`` -> codec ``stc:0.1``, error feedback on, fp16 downlink."""
    error_feedback, downlink = False, "fp32"
    while True:
        if text.endswith("+ef"):
            text, error_feedback = text[: -len("+ef")], True
        elif text.endswith("+fp16"):
            text, downlink = text[: -len("+fp16")], "fp16"
        else:
            return text, error_feedback, downlink


def train(text: str, out: Path, rounds: int, seed: int) -> dict[str, Any]:
    """One FEMNIST run with ``text``'s codec; bytes per client-round and final accuracy."""
    codec, error_feedback, downlink = _split(text)
    values = {
        **WORKLOAD,
        "compression": codec,
        "error-feedback": error_feedback,
        "downlink": downlink,
        "num-rounds": rounds,
        "seed": seed,
    }
    cfg = RunConfig.from_mapping(values)
    summary = simulate(cfg, out / f"{text.replace(':', '-').replace('+', '_')}-{seed}")
    history = summary["history"]
    replies = sum(r["clients"] for r in history)
    return {
        "bytes_up": sum(r["bytes_up"] for r in history),
        "bytes_down": sum(r["bytes_down"] for r in history),
        "sampled": sum(r["sampled"] for r in history),
        "replies": replies,
        "final_accuracy": summary["final"]["accuracy"],
        "wall_s": summary["wall_s"],
    }


def throughput(text: str, repeats: int = 5) -> dict[str, float]:
    """Encode and decode MB/s of fp32 input, 1M elements, one core (best of ``repeats``)."""
    from threadpoolctl import threadpool_limits

    codec, _, _ = _split(text)
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


def _table(rows: dict[str, dict[str, Any]]) -> str:
    head = (
        "| codec | bits / param | bytes up / client-round | of fp32 | bytes down / client-round "
        "| final accuracy | vs fp32 (points) | encode MB/s | decode MB/s |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for text, r in rows.items():
        codec, error_feedback, downlink = _split(text)
        name = f"`{codec}`" + (" + error feedback" if error_feedback else "")
        name += ", fp16 downlink" if downlink == "fp16" else ""
        lines.append(
            f"| {name} | {r['bits_per_param']:.2f} | {r['bytes_per_client_round']:,} | "
            f"1/{1 / r['uplink_ratio']:.1f} | {r['down_bytes_per_client_round']:,} | "
            f"{r['final_accuracy']:.4f} | {r['accuracy_delta_points']:+.2f} | "
            f"{r['encode_mb_s']:,} | {r['decode_mb_s']:,} |"
        )
    return head + "\n".join(lines)


def main() -> None:
    """Run the codecs and print one JSON object (and a Markdown table on stderr)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), help="codecs; '+ef': error feedback")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--rounds", type=int, default=WORKLOAD["num-rounds"])
    parser.add_argument("--throughput-only", action="store_true")
    args = parser.parse_args()
    if not args.throughput_only and not os.environ.get("FEDGE_DATA_DIR"):
        raise SystemExit("set FEDGE_DATA_DIR to the shared datasets folder (make bench does)")
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    codecs = list(args.codecs)
    if not args.throughput_only and "none" not in codecs:
        codecs.insert(0, "none")
    rows: dict[str, dict[str, Any]] = {text: throughput(text) for text in codecs}
    if not args.throughput_only:
        cfg = RunConfig.from_mapping(WORKLOAD)
        params = sum(p.numel() for p in cfg.build_model(cfg.federated_data().spec).parameters())
        runs: dict[str, list[dict[str, Any]]] = {text: [] for text in codecs}
        with tempfile.TemporaryDirectory() as tmp:
            # Seed by seed, every codec in turn: the codecs of one seed see the same clients.
            for seed in args.seeds:
                for text in codecs:
                    runs[text].append(train(text, Path(tmp), args.rounds, seed))
        base = runs["none"]
        base_bytes = sum(r["bytes_up"] for r in base) / sum(r["replies"] for r in base)
        for text, per_seed in runs.items():
            per_client = sum(r["bytes_up"] for r in per_seed) / sum(r["replies"] for r in per_seed)
            deltas = [
                100 * (r["final_accuracy"] - b["final_accuracy"]) for r, b in zip(per_seed, base, strict=True)
            ]
            rows[text].update(
                {
                    "bits_per_param": round(8 * per_client / params, 3),
                    "bytes_per_client_round": round(per_client),
                    "down_bytes_per_client_round": round(
                        sum(r["bytes_down"] for r in per_seed) / sum(r["sampled"] for r in per_seed)
                    ),
                    "uplink_ratio": round(per_client / base_bytes, 4),
                    "final_accuracy": round(float(np.mean([r["final_accuracy"] for r in per_seed])), 4),
                    "final_accuracy_per_seed": [round(r["final_accuracy"], 4) for r in per_seed],
                    "accuracy_delta_points": round(float(np.mean(deltas)), 2),
                    "wall_s_per_run": round(float(np.mean([r["wall_s"] for r in per_seed])), 1),
                }
            )
        print(_table(rows), file=sys.stderr)
    report = {"workload": WORKLOAD, "seeds": args.seeds, "parameters": None, "codecs": rows}
    if not args.throughput_only:
        report["parameters"] = params
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
