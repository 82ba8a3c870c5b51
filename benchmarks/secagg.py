"""Benchmark: fedge's SecAgg+ beside Flower's, on one cohort, in one run (issue 9).

The cohort (defaults): 100 clients, a 1M-parameter float32 update per client (the same
fixed vectors as :mod:`secagg_flower`: ``client_vector(seed, partition)``, uniform in
[-0.5, 0.5], ``num-examples = 1``), 10 % of the clients dropping after the share-keys
stage. Sections:

``protocol``
    fedge's pure protocol (:mod:`fedge.secagg.protocol`) at n = 100, one core: the time of
    ``ClientRound.masked_input`` (decrypt the neighbours' shares, 2 x k key agreements,
    self + k pairwise masks, bit packing) for every surviving client, and the server's
    unmasking (``ServerRound.unmask_requests`` + ``receive_unmask`` + ``result``: Shamir
    reconstruction, key checks, mask removal), with a breakdown of where each goes.
``rounds``
    Whole rounds on fedge's own engine: the real :class:`~fedge.server.loop.RoundLoop` with
    :class:`~fedge.server.secagg.SecAggTransport` (``secagg = true``) or
    :class:`~fedge.server.transport.PlainTransport`, on fedge's
    :class:`~fedge.simulation.grid.InProcessGrid` with ``inline=True`` (every ClientApp
    call in this process, one after another, as in :mod:`secagg_flower`; so a round's time
    is all clients' work plus the server's, on one core). The client app is fedge's update
    pipeline (``compression_mod``: encode, mask) around a handler that returns
    ``global + fixed vector``. Configurations: plain (``compression = none``), secure at
    8 bits (``compression = none``, ``secagg-bits = 8``) and secure ``rotate+qsgd:4``,
    interleaved round by round after a warm-up round of each; the plain round has the same
    clients fail in training. Flower's SecAggPlusWorkflow (:func:`secagg_flower.flower_secaggplus`)
    runs on the same cohort in the same process, for its bytes and times side by side.
``accuracy`` (needs ``FEDGE_DATA_DIR``)
    MNIST, 50 clients, 30 a round, 5 rounds, ``fedge simulate`` defaults otherwise: the same
    seed with and without ``secagg = true`` (no dropouts), per seed.

Bytes are Flower's protobuf serialization of each message content
(:func:`fedge.records.payload_bytes`), per finished client (one that answered every stage)
and round, summed over the stages; byte counting is left out of every time. Prints one
JSON object.

    make bench                                   # or: python benchmarks/secagg.py
    python benchmarks/secagg.py --no-accuracy    # bytes and times only (a few minutes)
    python benchmarks/secagg.py --accuracy       # the MNIST section only
    python benchmarks/secagg.py --quick          # n=10, 100k params, 1 repeat, no accuracy
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    # The grid imports the client app by reference ("secagg:fixed_app"), and this file
    # imports its Flower half (secagg_flower), however it was loaded.
    sys.path.append(str(_HERE))

from flwr.app import Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from secagg_flower import client_vector, flower_secaggplus  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from fedge import secagg_wire as wire  # noqa: E402
from fedge.client.mods import compression_mod, fp16_downlink_mod  # noqa: E402
from fedge.compression import parse_codec  # noqa: E402
from fedge.config import RunConfig  # noqa: E402
from fedge.records import (  # noqa: E402
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    SERVER_ROUND,
    TRAIN_LOSS,
    arrays_to_numpy,
    numpy_to_arrays,
    payload_bytes,
)
from fedge.rng import Stream, stream_rng  # noqa: E402
from fedge.secagg import crypto, find_graph_parameters, masking, shamir  # noqa: E402
from fedge.secagg.encoding import FieldEncoding  # noqa: E402
from fedge.secagg.protocol import STAGE_NAMES, ClientRound, RoundParams, ServerRound  # noqa: E402
from fedge.server.loop import RoundLoop  # noqa: E402
from fedge.server.secagg import SecAggTransport  # noqa: E402
from fedge.server.transport import PlainTransport  # noqa: E402
from fedge.simulation.grid import InProcessGrid  # noqa: E402
from fedge.strategies import build_strategy  # noqa: E402
from fedge.training import EvalResult  # noqa: E402

_MODULE = "secagg"  # the name the grid imports this file under (see sys.path above)
PLAIN_STAGE = "train"
SECURE_STAGES = tuple(STAGE_NAMES.values())  # advertise-keys, share-keys, masked-input, unmask
DROP_STAGE = "share-keys"
CLIP = 0.5  # the updates' range, as Flower's clipping_range
MAX_DROPOUT = 0.1  # secagg-max-dropout: k = 22, t = 12 at n = 100 (find_graph_parameters)
TENSOR = "w"
# fedge's configurations of the rounds section: name -> config keys over the cohort's.
CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {"secagg": False, "compression": "none"},
    "secagg-8bit": {"secagg": True, "compression": "none", "secagg-bits": 8},
    "secagg-rotate+qsgd:4": {"secagg": True, "compression": "rotate+qsgd:4"},
}
# The accuracy section: MNIST, 50 clients, 30 a round, 5 rounds.
ACCURACY_WORKLOAD: dict[str, Any] = {
    "dataset": "mnist",
    "num-clients": 50,
    "clients-per-round": 30,
    "num-rounds": 5,
    "export-every": "off",
}
TARGETS = {
    "uplink_ratio_vs_flower_max": 0.25,
    "masked_bytes_per_param_max": 2.0,
    "client_mask_s_max": 0.050,
    "server_unmask_s_max": 2.0,
    "round_overhead_max": 1.3,
    "accuracy_delta_points_max": 1.0,
}


# --- client ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _fixed_update(seed: int, partition: int, num_params: int) -> np.ndarray:
    return client_vector(seed, partition, num_params)


def dropped_partitions(seed: int, server_round: int, num_clients: int, fraction: float) -> set[int]:
    """The partitions fedge's SecAggTransport makes vanish in ``server_round`` (all clients sampled).

    The transport draws ``floor(fraction * n)`` indices into the sorted cohort from
    ``stream_rng(seed, SECAGG_DROPOUT, round)``; the grid's node ``FIRST_NODE_ID + k`` is
    partition ``k``, so the sorted cohort's index is the partition.
    """
    rng = stream_rng(seed, Stream.SECAGG_DROPOUT, server_round)
    count = math.floor(fraction * num_clients)
    return {int(i) for i in rng.choice(num_clients, size=count, replace=False)}


fixed_app = ClientApp(mods=[fp16_downlink_mod, compression_mod])


@fixed_app.train()
def _train(msg: Message, context: Context) -> Message:
    """``global + fixed vector`` with ``num-examples = 1``; the round's dropouts raise.

    In a secure round the dropped clients never get the training (masked-input) message;
    in a plain round the same clients raise here, so both rounds lose the same clients.
    """
    cfg = context.run_config
    partition = int(context.node_config["partition-id"])
    server_round = int(msg.content.config_records[CONFIG_KEY][SERVER_ROUND])
    seed, n = int(cfg["seed"]), int(cfg["num-clients"])
    if partition in dropped_partitions(seed, server_round, n, float(cfg["drop-fraction"])):
        raise RuntimeError(f"client {partition} drops out (benchmark)")
    (name, reference), *_ = arrays_to_numpy(msg.content.array_records[ARRAYS_KEY]).items()
    local = reference + _fixed_update(seed, partition, reference.size)
    content = RecordDict(
        {
            ARRAYS_KEY: numpy_to_arrays({name: local}),
            METRICS_KEY: MetricRecord({NUM_EXAMPLES: 1, TRAIN_LOSS: 0.0}),
        }
    )
    return Message(content, reply_to=msg)


# --- engine ---------------------------------------------------------------------------


def _stage_of(message: Message) -> str:
    record = message.content.config_records.get(wire.SECAGG_KEY) if message.has_content() else None
    return PLAIN_STAGE if record is None else STAGE_NAMES[wire.stage_of(record)]


class MeteredGrid(InProcessGrid):
    """fedge's grid, counting each batch's uplink bytes per node (time spent counting is kept apart)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[dict[str, Any]] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        t0 = time.perf_counter()
        batch = list(messages)
        stage = _stage_of(batch[0]) if batch else PLAIN_STAGE
        t1 = time.perf_counter()
        replies = list(super().send_and_receive(batch, timeout=timeout))
        t2 = time.perf_counter()
        up = {int(r.metadata.src_node_id): payload_bytes(r.content) for r in replies if not r.has_error()}
        errors = sum(1 for r in replies if r.has_error())
        self.batches.append(
            {"stage": stage, "up": up, "errors": errors, "meter_s": (t1 - t0) + (time.perf_counter() - t2)}
        )
        return replies


def _cohort_config(name: str, num_clients: int, seed: int, drop_fraction: float) -> RunConfig:
    values = {
        "num-clients": num_clients,
        "clients-per-round": num_clients,
        "seed": seed,
        "fraction-evaluate": 0.0,
        "min-reply-fraction": 0.5,
        "secagg-clip": CLIP,
        "secagg-max-dropout": MAX_DROPOUT,
        "secagg-drop-fraction": drop_fraction,
        "secagg-drop-stage": DROP_STAGE,
        "export-every": "off",
        **CONFIGS[name],
    }
    return RunConfig.from_mapping(values)


def _uplink_per_stage(batches: list[dict[str, Any]]) -> tuple[dict[str, float], int]:
    """Mean reply bytes per stage over the clients that answered the round's last stage."""
    finished = set(batches[-1]["up"])
    out = {b["stage"]: float(np.mean([b["up"].get(n, 0) for n in finished])) for b in batches}
    return out, len(finished)


def engine_rounds(
    num_clients: int, num_params: int, drop_fraction: float, seed: int, repeats: int
) -> dict[str, Any]:
    """Interleaved rounds of every configuration of :data:`CONFIGS` on one inline grid."""
    run_config = {"seed": seed, "num-clients": num_clients, "drop-fraction": drop_fraction}
    initial = numpy_to_arrays({TENSOR: np.zeros(num_params, dtype=np.float32)})
    out: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        MeteredGrid(f"{_MODULE}:fixed_app", num_clients, run_config, inline=True) as grid,
    ):
        loops: dict[str, RoundLoop] = {}
        for name in CONFIGS:
            cfg = _cohort_config(name, num_clients, seed, drop_fraction)
            transport = SecAggTransport(cfg, 1) if cfg.secagg else PlainTransport()
            loops[name] = RoundLoop(
                cfg,
                build_strategy(cfg),
                initial,
                lambda arrays: EvalResult(1, 0.0, 0.0),
                Path(tmp) / name,
                transport=transport,
                train_settings={},
                max_examples=1,
            )
        times: dict[str, list[float]] = {name: [] for name in CONFIGS}
        records: dict[str, Any] = {}
        # Round 1 of every configuration warms up (imports, caches, the client vectors);
        # then rounds 2.. alternate the configurations, so drift on the machine hits all.
        for server_round in range(1, repeats + 2):
            for name, loop in loops.items():
                grid.batches.clear()
                start = time.perf_counter()
                record = loop.run_round(grid, server_round)
                wall = time.perf_counter() - start - sum(b["meter_s"] for b in grid.batches)
                if not record.aggregated:
                    raise RuntimeError(f"{name} round {server_round} did not aggregate: {record}")
                expected = num_clients - len(
                    dropped_partitions(seed, server_round, num_clients, drop_fraction)
                )
                if record.clients != expected:
                    raise RuntimeError(
                        f"{name} round {server_round}: {record.clients} clients, not {expected}"
                    )
                if server_round > 1:
                    times[name].append(wall)
                per_stage, finished = _uplink_per_stage(grid.batches)
                records[name] = {"record": record, "per_stage": per_stage, "finished": finished}
                records[name]["arrays"] = arrays_to_numpy(loop.arrays)[TENSOR]
        plain_s = statistics.median(times["plain"])
        for name in CONFIGS:
            rec = records[name]
            record = rec["record"]
            per_stage = rec["per_stage"]
            # Every loop's model is the sum of the same rounds' survivor means (each round drops
            # the same clients in every loop): the secure model is the plain one up to quantization.
            error = float(np.max(np.abs(rec["arrays"] - records["plain"]["arrays"])))
            out[name] = {
                "config": {k: v for k, v in CONFIGS[name].items()},
                "uplink_bytes_per_client": float(sum(per_stage.values())),
                "uplink_bytes_per_stage": per_stage,
                "finished_clients": rec["finished"],
                "round_s": statistics.median(times[name]),
                "round_s_all": [round(t, 3) for t in times[name]],
                "overhead_vs_plain": statistics.median(times[name]) / plain_s,
                "overhead_vs_plain_paired": statistics.median(
                    s / p for s, p in zip(times[name], times["plain"], strict=True)
                ),
                "max_abs_diff_vs_plain_model": error,
            }
            if record.secagg is not None:
                out[name].update(
                    neighbors=record.secagg["neighbors"],
                    threshold=record.secagg["threshold"],
                    field_bits=record.secagg["field_bits"],
                    dropped_per_stage=record.secagg["dropped_per_stage"],
                    masked_bytes_per_param=per_stage["masked-input"] / num_params,
                )
    return out


# --- pure protocol --------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def protocol_timings(
    num_clients: int, num_params: int, drop_fraction: float, seed: int, level_bits: int = 8
) -> dict[str, Any]:
    """fedge's SecAgg+ round in pure math at ``num_clients``, one core, with a breakdown."""
    graph = find_graph_parameters(num_clients, MAX_DROPOUT)
    encoding = FieldEncoding.for_codec(parse_codec("none"), level_bits, CLIP, 1)
    length = num_params + encoding.weight_digits()
    params = RoundParams(
        1, num_clients, graph.degree, graph.threshold, encoding.field_bits(num_clients), length
    )
    m = params.field_bits
    rng = np.random.default_rng(seed)
    random_bytes = rng.bytes  # seeded secrets (os.urandom in production): a reproducible run
    clients = [ClientRound(params, u, random_bytes) for u in range(num_clients)]
    server = ServerRound(params)
    server.receive_keys({u: c.advertise() for u, c in enumerate(clients)})
    lists = server.key_lists()
    shares = {u: clients[u].share_keys(lists[u]) for u in range(num_clients)}
    server.receive_shares(shares, {u: clients[u].self_mask_commitment for u in range(num_clients)})
    forwarded = server.forward()
    dropped = {int(u) for u in rng.choice(num_clients, round(drop_fraction * num_clients), replace=False)}
    survivors = [u for u in range(num_clients) if u not in dropped]
    top = (1 << level_bits) - 1
    levels = {u: rng.integers(0, top + 1, length, dtype=np.uint64) for u in survivors}

    mask_s: list[float] = []
    inputs = {}
    for u in survivors:
        start = time.perf_counter()
        packed, masked_with = clients[u].masked_input(forwarded[u], levels[u])
        mask_s.append(time.perf_counter() - start)
        inputs[u] = (packed, masked_with)
    start = time.perf_counter()
    server.receive_masked(inputs)
    receive_masked_s = time.perf_counter() - start

    start = time.perf_counter()
    requests = server.unmask_requests()
    requests_s = time.perf_counter() - start
    replies = {u: clients[u].unmask(*requests[u]) for u in requests}
    start = time.perf_counter()
    server.receive_unmask(replies)
    receive_s = time.perf_counter() - start
    start = time.perf_counter()
    level_sum = server.result()
    result_s = time.perf_counter() - start
    expected = np.sum([levels[u] for u in survivors], axis=0, dtype=np.uint64)
    exact = bool(np.array_equal(level_sum, expected))

    # Breakdown of the client's masked_input: its parts on the same sizes, best of 3.
    k = graph.degree
    priv = crypto.private_key_from_secret(rng.bytes(32))
    peers = [
        crypto.public_key_from_bytes(c.advertise()[0])
        for c in (ClientRound(params, v, rng.bytes) for v in range(k))
    ]
    y = levels[survivors[0]]
    seeds = {v + 1: rng.bytes(32) for v in range(k)}

    def best(fn: Any, repeats: int = 3) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    ct_key = crypto.agree(priv, peers[0], crypto.INFO_SHARE_KEY)
    ad = crypto.associated_data(1, 0, 1, 2)
    ct = crypto.encrypt_share(ct_key, bytes(2 * shamir.SHARE_BYTES), ad, bytes(crypto.NONCE_BYTES))
    masked = masking.mask(y, seeds[1], seeds, 0, m)
    client_parts = {
        "key_agreements_2k_s": best(
            lambda: [crypto.agree(priv, p, crypto.INFO_SHARE_KEY) for p in peers for _ in range(2)]
        ),
        "decrypt_k_shares_s": best(lambda: [crypto.decrypt_share(ct_key, ct, ad) for _ in range(k)]),
        "mask_s": best(lambda: masking.mask(y, seeds[1], seeds, 0, m)),
        "one_prg_vector_s": best(lambda: crypto.prg_words(seeds[1], length, m)),
        "pack_s": best(lambda: masking.pack(masked, m)),
    }
    packed0 = inputs[survivors[0]][0]
    server_parts = {
        "unpack_one_s": best(lambda: masking.unpack(packed0, length, m)),
        "shamir_reconstruct_one_s": best(
            lambda: shamir.reconstruct(
                [
                    shamir.decode_share(replies[w].self_mask_shares[survivors[0]])
                    for w in replies
                    if survivors[0] in replies[w].self_mask_shares
                ][: graph.threshold],
                graph.threshold,
            )
        ),
        "self_masks_removed": len(survivors),
        "pair_masks_removed": sum(1 for u in survivors for v in dropped if v in clients[u]._masked_with),
    }
    return {
        "num_clients": num_clients,
        "vector_length": length,
        "field_bits": m,
        "neighbors": graph.degree,
        "threshold": graph.threshold,
        "dropped": len(dropped),
        "client_mask_s": _median(mask_s),
        "client_mask_s_min": float(min(mask_s)),
        "client_mask_s_max": float(max(mask_s)),
        "client_mask_samples": len(mask_s),
        "client_mask_breakdown_s": client_parts,
        "server_unmask_s": requests_s + receive_s + result_s,
        "server_unmask_breakdown_s": {
            "unmask_requests_s": requests_s,
            "receive_unmask_s": receive_s,
            "result_s": result_s,
            **server_parts,
        },
        "server_receive_masked_s": receive_masked_s,
        "masked_bytes_per_param": params.masked_bytes() / num_params,
        "sum_exact": exact,
    }


# --- accuracy -------------------------------------------------------------------------


def accuracy(seeds: list[int], rounds: int) -> dict[str, Any]:
    """MNIST with and without secure aggregation, per seed (same seed, same cohorts)."""
    from fedge.simulation.runner import simulate

    per_seed = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            row: dict[str, Any] = {"seed": seed}
            for secure in (False, True):
                cfg = RunConfig.from_mapping(
                    {**ACCURACY_WORKLOAD, "num-rounds": rounds, "seed": seed, "secagg": secure}
                )
                name = "secagg" if secure else "plain"
                summary = simulate(cfg, Path(tmp) / f"{name}-{seed}")
                row[f"{name}_accuracy"] = float(summary["final"]["accuracy"])
                row[f"{name}_wall_s"] = round(float(summary["wall_s"]), 1)
            row["delta_points"] = round(100 * (row["secagg_accuracy"] - row["plain_accuracy"]), 2)
            per_seed.append(row)
    deltas = [r["delta_points"] for r in per_seed]
    return {
        "workload": {
            **ACCURACY_WORKLOAD,
            "num-rounds": rounds,
            "secagg-clip": f"default ({RunConfig().secagg_clip})",
            "secagg-bits": "auto (8)",
        },
        "seeds": seeds,
        "per_seed": per_seed,
        "plain_accuracy_mean": float(np.mean([r["plain_accuracy"] for r in per_seed])),
        "secagg_accuracy_mean": float(np.mean([r["secagg_accuracy"] for r in per_seed])),
        "delta_points_mean": float(np.mean(deltas)),
        "delta_points_max_abs": float(max(abs(d) for d in deltas)),
    }


# --- report ---------------------------------------------------------------------------


def compare(
    num_clients: int, num_params: int, drop_fraction: float, seed: int, repeats: int
) -> dict[str, Any]:
    """The protocol and rounds sections with Flower's figures beside them, and the ratios."""
    with threadpool_limits(limits=1):
        protocol = protocol_timings(num_clients, num_params, drop_fraction, seed)
        rounds = engine_rounds(num_clients, num_params, drop_fraction, seed, repeats)
        flower = flower_secaggplus(num_clients, num_params, drop_fraction, seed=seed)
    flower.pop("notes", None)
    plain_up = rounds["plain"]["uplink_bytes_per_client"]
    ratios = {}
    for name in ("secagg-8bit", "secagg-rotate+qsgd:4"):
        r = rounds[name]
        ratios[name] = {
            "uplink_vs_flower": r["uplink_bytes_per_client"] / flower["uplink_bytes_per_client"],
            "uplink_vs_fedge_plain": r["uplink_bytes_per_client"] / plain_up,
            "masked_bytes_per_param": r["masked_bytes_per_param"],
            "overhead_vs_plain": r["overhead_vs_plain"],
        }
    ratios["client_mask_s_fedge_over_flower"] = protocol["client_mask_s"] / flower["client_mask_s"]
    ratios["server_unmask_s_fedge_over_flower"] = protocol["server_unmask_s"] / flower["server_unmask_s"]
    ratios["overhead_fedge_8bit_vs_flower"] = rounds["secagg-8bit"]["overhead_vs_plain"] / flower["overhead"]
    secure = rounds["secagg-8bit"]
    met = {
        "uplink_ratio_vs_flower": secure["uplink_bytes_per_client"] / flower["uplink_bytes_per_client"]
        <= TARGETS["uplink_ratio_vs_flower_max"],
        "masked_bytes_per_param": secure["masked_bytes_per_param"] <= TARGETS["masked_bytes_per_param_max"],
        "client_mask_s": protocol["client_mask_s"] <= TARGETS["client_mask_s_max"],
        "server_unmask_s": protocol["server_unmask_s"] <= TARGETS["server_unmask_s_max"],
        "round_overhead": secure["overhead_vs_plain"] <= TARGETS["round_overhead_max"],
    }
    return {
        "cohort": {
            "num_clients": num_clients,
            "num_params": num_params,
            "drop_fraction": drop_fraction,
            "drop_stage": DROP_STAGE,
            "seed": seed,
            "repeats": repeats,
            "engine": "fedge RoundLoop on InProcessGrid(inline=True), one core (threadpool_limits 1)",
        },
        "fedge_protocol": protocol,
        "fedge_rounds": rounds,
        "flower": flower,
        "ratios": ratios,
        "targets": TARGETS,
        "targets_met": met,
    }


def main(argv: list[str] | None = None) -> None:
    """Run the sections and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n=10, 100k params, 1 repeat, no accuracy")
    parser.add_argument("--num-clients", type=int, default=100)
    parser.add_argument("--num-params", type=int, default=1_000_000)
    parser.add_argument("--drop-fraction", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per configuration")
    parser.add_argument("--seed", type=int, default=0)
    section = parser.add_mutually_exclusive_group()
    section.add_argument("--accuracy", action="store_true", help="only the MNIST accuracy section")
    section.add_argument("--no-accuracy", action="store_true", help="only the bytes and times")
    parser.add_argument("--accuracy-seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--accuracy-rounds", type=int, default=ACCURACY_WORKLOAD["num-rounds"])
    args = parser.parse_args(argv)
    if args.quick:
        args.num_clients, args.num_params, args.repeats, args.no_accuracy = 10, 100_000, 1, True
    run_accuracy = not args.no_accuracy
    if run_accuracy and not os.environ.get("FEDGE_DATA_DIR"):
        raise SystemExit("set FEDGE_DATA_DIR to the shared datasets folder (make bench does)")
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    logging.getLogger("fedge").setLevel(logging.ERROR)  # the run's own warnings (simulated dropouts)
    report: dict[str, Any] = {}
    if not args.accuracy:
        report.update(compare(args.num_clients, args.num_params, args.drop_fraction, args.seed, args.repeats))
    if run_accuracy:
        acc = accuracy(args.accuracy_seeds, args.accuracy_rounds)
        report["accuracy"] = acc
        if "targets_met" in report:
            report["targets_met"]["accuracy"] = (
                acc["delta_points_max_abs"] <= TARGETS["accuracy_delta_points_max"]
            )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
