"""Benchmark: Flower 1.39's own SecAgg+ on one cohort, for side-by-side figures with fedge's.

Flower's legacy path, unchanged: ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))``
on a ``LegacyContext`` (FedAvg, every client sampled), clients a legacy ``NumPyClient``
in a ``ClientApp`` with ``mods=[secaggplus_mod]``. The engine is fedge's in-process Grid
(:class:`fedge.simulation.grid.InProcessGrid` with ``inline=True``: every ClientApp call
runs in this process, one after another, so client and server times are CPU times of one
core, not hidden behind parallel workers). No Ray, no network.

The client's ``fit`` returns a fixed float32 vector of ``num_params`` values in
[-0.5, 0.5] (``numpy.random.default_rng([seed, partition])``) with ``num_examples=1``, so
training costs nothing. ``round(drop_fraction * num_clients)`` clients drop after the
share-keys stage: their ``fit`` raises, which happens only in Flower's
collect-masked-vectors stage (the first that calls the inner app); the grid turns the
exception into an error reply, as Flower's runtimes do, and the workflow counts the
client as dropped and has its neighbours' shares unmask its pairwise masks.

The plain round (``plain_round_s``) is the same DefaultWorkflow with Flower's default fit
workflow on the same engine, with the same client (minus ``secaggplus_mod``) and the same
clients failing in ``fit``.

Sizes are Flower's serialization of the message content
(:func:`fedge.records.payload_bytes`, protobuf), summed over the protocol's stages of one
round; uplink means over the clients that finished the round.

    python benchmarks/secagg_flower.py             # n=100, 1M params, 10% drop
    python benchmarks/secagg_flower.py --quick     # n=10, 100k params
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    # The grid imports the client apps by reference ("secagg_flower:..."), however this
    # file was loaded (as a script, or by another benchmark). Appended, so the other
    # benchmarks here never shadow a module of the same name.
    sys.path.append(str(_HERE))

from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.client import NumPyClient  # noqa: E402
from flwr.client.mod import secaggplus_mod  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.clientapp.typing import ClientAppCallable  # noqa: E402
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen  # noqa: E402
from flwr.common.serde import message_from_proto, message_to_proto  # noqa: E402
from flwr.compat.common import recorddict_compat as compat  # noqa: E402
from flwr.server import ServerConfig  # noqa: E402
from flwr.server.compat import LegacyContext  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow  # noqa: E402
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD  # noqa: E402
from flwr.server.workflow.default_workflows import default_fit_workflow  # noqa: E402

from fedge.records import payload_bytes  # noqa: E402
from fedge.secagg.graph import find_graph_parameters  # noqa: E402
from fedge.simulation.grid import InProcessGrid  # noqa: E402

_MODULE = "secagg_flower"  # the name the grid imports this file under (see sys.path above)
STAGES = (Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK)
PLAIN_STAGE = "fit"

# Client-side timings, filled by the mods below (in the copy of this module the grid
# imported; inline, that is this process): {"stage": {stage: {node: s}}, "fit": {node: s}}.
_STATS: dict[str, dict[Any, Any]] = {"stage": {}, "fit": {}}


# --- client ---------------------------------------------------------------------------


def client_vector(seed: int, partition: int, num_params: int) -> np.ndarray:
    """The fixed update a client returns: float32 values in [-0.5, 0.5]."""
    rng = np.random.default_rng([seed, partition])
    return rng.uniform(-0.5, 0.5, num_params).astype(np.float32)


class FixedClient(NumPyClient):
    """``fit`` returns a fixed vector with ``num_examples=1`` (or raises: a dropout)."""

    def __init__(self, seed: int, partition: int, num_params: int, drop: bool) -> None:
        self.seed, self.partition, self.num_params, self.drop = seed, partition, num_params, drop

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        if self.drop:
            raise RuntimeError(f"client {self.partition} drops out (benchmark)")
        return [client_vector(self.seed, self.partition, self.num_params)], 1, {}


def _client_fn(context: Context) -> Any:
    cfg = context.run_config
    partition = int(context.node_config["partition-id"])
    dropped = {int(p) for p in str(cfg["drop-partitions"]).split(",") if p}
    client = FixedClient(int(cfg["seed"]), partition, int(cfg["num-params"]), partition in dropped)
    return client.to_client()


def _stage_of(message: Message) -> str:
    if message.has_content() and RECORD_KEY_CONFIGS in message.content.config_records:
        return str(message.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, PLAIN_STAGE))
    return PLAIN_STAGE


def stage_timer_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Outermost mod: the client's time in each stage (a raise is not recorded)."""
    stage = _stage_of(msg)  # read before secaggplus_mod pops it
    start = time.perf_counter()
    reply = call_next(msg, ctxt)
    _STATS["stage"].setdefault(stage, {})[msg.metadata.dst_node_id] = time.perf_counter() - start
    return reply


def fit_timer_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Innermost mod: the inner app's time (client_fn, fit, Flower's legacy conversions)."""
    start = time.perf_counter()
    reply = call_next(msg, ctxt)
    _STATS["fit"][msg.metadata.dst_node_id] = time.perf_counter() - start
    return reply


secagg_app = ClientApp(client_fn=_client_fn, mods=[stage_timer_mod, secaggplus_mod, fit_timer_mod])
plain_app = ClientApp(client_fn=_client_fn, mods=[stage_timer_mod, fit_timer_mod])


# --- server ---------------------------------------------------------------------------


class MeteredGrid(InProcessGrid):
    """fedge's inline grid, counting each batch's message sizes and delivery time.

    One entry in ``batches`` per ``send_and_receive``: its stage, downlink and uplink
    bytes per node (uplink only for replies without an error), the delivery time (the
    clients' work) and the time spent copying messages and counting bytes (left out of
    every reported time).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[dict[str, Any]] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        t0 = time.perf_counter()
        batch = list(messages)
        stage = _stage_of(batch[0]) if batch else PLAIN_STAGE
        # Each client gets its own copy, as off a wire: inline, Flower's workflow would
        # otherwise hand every client the same RecordDict (one client's secaggplus_mod pops
        # the stage key from it for all the others).
        protos = [message_to_proto(m) for m in batch]
        down = {m.metadata.dst_node_id: p.content.ByteSize() for m, p in zip(batch, protos, strict=True)}
        copies = [message_from_proto(p) for p in protos]
        t1 = time.perf_counter()
        replies = list(super().send_and_receive(copies, timeout=timeout))
        t2 = time.perf_counter()
        up = {r.metadata.src_node_id: payload_bytes(r.content) for r in replies if not r.has_error()}
        errors = sum(1 for r in replies if r.has_error())
        t3 = time.perf_counter()
        self.batches.append(
            {
                "stage": stage,
                "down": down,
                "up": up,
                "errors": errors,
                "deliver_s": t2 - t1,
                "meter_s": (t1 - t0) + (t3 - t2),
            }
        )
        return replies


class TimedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAggPlusWorkflow, unchanged, with each stage's wall time recorded."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stage_wall_s: dict[str, float] = {}
        self.completed: list[str] = []
        self.protocol: dict[str, int] = {}

    def _timed(self, name: str, step: Callable[..., bool], grid: Any, context: Any, state: Any) -> bool:
        start = time.perf_counter()
        ok = step(grid, context, state)
        self.stage_wall_s[name] = time.perf_counter() - start
        if ok:
            self.completed.append(name)
        self.protocol = {"num_shares": state.num_shares, "threshold": state.threshold}
        return ok

    def setup_stage(self, grid, context, state):  # type: ignore[no-untyped-def]
        return self._timed(Stage.SETUP, super().setup_stage, grid, context, state)

    def share_keys_stage(self, grid, context, state):  # type: ignore[no-untyped-def]
        return self._timed(Stage.SHARE_KEYS, super().share_keys_stage, grid, context, state)

    def collect_masked_vectors_stage(self, grid, context, state):  # type: ignore[no-untyped-def]
        return self._timed(
            Stage.COLLECT_MASKED_VECTORS, super().collect_masked_vectors_stage, grid, context, state
        )

    def unmask_stage(self, grid, context, state):  # type: ignore[no-untyped-def]
        return self._timed(Stage.UNMASK, super().unmask_stage, grid, context, state)


class TimedFedAvg(FedAvg):
    """Flower's FedAvg, unchanged, with the time of ``aggregate_fit`` recorded."""

    aggregate_fit_s = 0.0

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        out = super().aggregate_fit(server_round, results, failures)
        self.aggregate_fit_s = time.perf_counter() - start
        return out


def _run_round(
    app_name: str,
    fit_workflow: Callable[..., None] | None,
    num_clients: int,
    num_params: int,
    dropped: list[int],
    seed: int,
) -> tuple[MeteredGrid, float, float, np.ndarray]:
    """One DefaultWorkflow round on a fresh grid; returns the grid, the fit round's time
    (byte counting left out), FedAvg's aggregate_fit time and the aggregated vector."""
    random.seed(seed)  # Flower shuffles the SecAgg+ ring with `random`
    np.random.seed(seed)  # and rounds stochastically with numpy's global generator
    run_config = {"num-params": num_params, "seed": seed, "drop-partitions": ",".join(map(str, dropped))}
    grid = MeteredGrid(f"{_MODULE}:{app_name}", num_clients, run_config, inline=True)
    strategy = TimedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=num_clients,
        min_evaluate_clients=0,
        min_available_clients=num_clients,
        accept_failures=True,
        initial_parameters=ndarrays_to_parameters([np.zeros(num_params, dtype=np.float32)]),
    )
    context = LegacyContext(
        Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
    )
    inner = fit_workflow or default_fit_workflow
    round_s: list[float] = []

    def timed_fit(grid_: Any, context_: Any) -> None:
        start = time.perf_counter()
        inner(grid_, context_)
        round_s.append(time.perf_counter() - start)

    with grid:
        DefaultWorkflow(fit_workflow=timed_fit)(grid, context)
    meter_s = sum(b["meter_s"] for b in grid.batches)
    params = compat.arrayrecord_to_parameters(
        context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
    )
    aggregate = parameters_to_ndarrays(params)[0]
    return grid, round_s[0] - meter_s, strategy.aggregate_fit_s, aggregate


def _per_stage(grid: MeteredGrid, key: str, finished: set[int]) -> dict[str, float]:
    """Mean bytes per finished client, per stage (0 for a stage a client never saw)."""
    out: dict[str, float] = {}
    for batch in grid.batches:
        if batch["stage"] in STAGES:
            sizes = batch[key]
            out[batch["stage"]] = float(np.mean([sizes.get(n, 0) for n in finished])) if finished else 0.0
    return out


def flower_secaggplus(
    num_clients: int = 100,
    num_params: int = 1_000_000,
    drop_fraction: float = 0.1,
    quantization_range: int = 2**8,
    seed: int = 0,
    *,
    clipping_range: float = 0.5,
    num_shares: int | None = None,
    reconstruction_threshold: int | None = None,
    modulus_range: int = 2**32,
) -> dict[str, object]:
    """Run one Flower SecAgg+ round and the same plain round; return the figures (JSON-able).

    ``num_shares``/``reconstruction_threshold`` default to the graph fedge's own SecAgg+
    picks for this cohort (:func:`fedge.secagg.graph.find_graph_parameters`: degree ``k``,
    threshold ``t``): Flower's ``num_shares = k + 1`` (Flower counts the client itself among
    its share holders and neighbours) and ``reconstruction_threshold = t``. Flower has no
    default for either; its examples' ``num_shares=3, reconstruction_threshold=2`` would
    abort the round whenever two neighbouring clients of the ring drop (most rounds at 10 %).
    ``clipping_range=0.5`` matches the updates' [-0.5, 0.5]; ``quantization_range=2**8``
    mirrors 8-bit quantization; ``modulus_range=2**32`` and the rest are Flower's defaults,
    except ``max_weight=1`` (``num_examples`` is 1; with Flower's 1000 the weight would
    quantize to 0).
    """
    if num_shares is None or reconstruction_threshold is None:
        graph = find_graph_parameters(num_clients, drop_fraction)
        num_shares = graph.degree + 1 if num_shares is None else num_shares
        reconstruction_threshold = (
            graph.threshold if reconstruction_threshold is None else reconstruction_threshold
        )
    num_dropped = round(drop_fraction * num_clients)
    dropped = sorted(
        int(p) for p in np.random.default_rng(seed).choice(num_clients, num_dropped, replace=False)
    )
    finished_partitions = [p for p in range(num_clients) if p not in set(dropped)]

    stats = importlib.import_module(_MODULE)._STATS
    for part in stats.values():
        part.clear()
    logging.getLogger("flwr").setLevel(logging.WARNING)

    # --- SecAgg+ round
    workflow = TimedSecAggPlusWorkflow(
        num_shares=num_shares,
        reconstruction_threshold=reconstruction_threshold,
        max_weight=1.0,
        clipping_range=clipping_range,
        quantization_range=quantization_range,
        modulus_range=modulus_range,
    )
    grid, round_s, aggregate_fit_s, secagg_aggregate = _run_round(
        "secagg_app", workflow, num_clients, num_params, dropped, seed
    )
    if workflow.completed != list(STAGES):
        raise RuntimeError(f"Flower's SecAgg+ halted after stages {workflow.completed}")
    stage_stats = {stage: dict(times) for stage, times in stats["stage"].items()}
    fit_stats = dict(stats["fit"])
    masked = Stage.COLLECT_MASKED_VECTORS
    finished = set(stage_stats[Stage.UNMASK])  # nodes that answered every stage
    by_stage = {b["stage"]: b for b in grid.batches if b["stage"] in STAGES}
    uplink = _per_stage(grid, "up", finished)
    downlink = _per_stage(grid, "down", finished)
    client_stage_s = {s: float(statistics.median(stage_stats[s][n] for n in finished)) for s in STAGES}
    mask_s = [stage_stats[masked][n] - fit_stats[n] for n in finished]
    server_stage_s = {
        s: workflow.stage_wall_s[s] - by_stage[s]["deliver_s"] - by_stage[s]["meter_s"] for s in STAGES
    }
    del grid

    # --- plain round
    for part in stats.values():
        part.clear()
    plain_grid, plain_round_s, plain_aggregate_fit_s, plain_aggregate = _run_round(
        "plain_app", None, num_clients, num_params, dropped, seed
    )
    plain_finished = set(stats["stage"].get(PLAIN_STAGE, {}))
    plain_up = float(np.mean([plain_grid.batches[-1]["up"][n] for n in plain_finished]))
    plain_down = float(np.mean([plain_grid.batches[-1]["down"][n] for n in plain_finished]))
    del plain_grid

    # --- checks and one PRG vector, outside every timing
    expected = np.mean([client_vector(seed, p, num_params) for p in finished_partitions], axis=0)
    prg_s = []
    for k in range(3):
        start = time.perf_counter()
        pseudo_rand_gen(bytes([k]) * 32, modulus_range, [(num_params,)])
        prg_s.append(time.perf_counter() - start)

    return {
        "engine": "flower-1.39 SecAggPlusWorkflow (legacy DefaultWorkflow), fedge InProcessGrid(inline=True)",
        "num_clients": num_clients,
        "num_params": num_params,
        "drop_fraction": drop_fraction,
        "dropped": num_clients - len(finished),
        "num_shares": workflow.protocol["num_shares"],
        "reconstruction_threshold": workflow.protocol["threshold"],
        "clipping_range": clipping_range,
        "quantization_range": quantization_range,
        "modulus_range": modulus_range,
        "seed": seed,
        "uplink_bytes_per_client": float(sum(uplink.values())),
        "uplink_bytes_per_stage": uplink,
        "downlink_bytes_per_client": float(sum(downlink.values())),
        "downlink_bytes_per_stage": downlink,
        "bytes_per_param_masked_vector": uplink[masked] / num_params,
        "plain_uplink_bytes_per_client": plain_up,
        "plain_downlink_bytes_per_client": plain_down,
        "client_mask_s": float(statistics.median(mask_s)),
        "client_stage_s": client_stage_s,
        "prg_one_vector_s": float(min(prg_s)),
        "server_unmask_s": server_stage_s[Stage.UNMASK] - aggregate_fit_s,
        "server_unmask_stage_s": server_stage_s[Stage.UNMASK],
        "server_aggregate_fit_s": aggregate_fit_s,
        "plain_server_aggregate_fit_s": plain_aggregate_fit_s,
        "server_stage_s": server_stage_s,
        "round_s": round_s,
        "plain_round_s": plain_round_s,
        "overhead": round_s / plain_round_s,
        "max_abs_error": float(np.max(np.abs(secagg_aggregate - expected))),
        "plain_max_abs_error": float(np.max(np.abs(plain_aggregate - expected))),
        "notes": (
            "Inline engine: clients run one after another in this process, so round_s is the sum of "
            "all clients' work plus the server's (one core). Dropouts: fit raises in the "
            "collect-masked-vectors stage (after share-keys); the grid answers with an error reply. "
            "client_mask_s: median over finished clients of the time in secaggplus_mod's "
            "collect-masked-vectors stage minus the inner app's (client_fn, fit, legacy conversions), "
            "i.e. share decryption, weighting, quantization, one private + (neighbours) pairwise "
            "pseudo_rand_gen masks, mod, ndarray_to_bytes. Flower's masked vector is int64 "
            "(np.save via ndarray_to_bytes: 8 bytes/param whatever modulus_range/quantization_range). "
            "server_stage_s: each stage's wall time minus its delivery to clients. server_unmask_s: the "
            "unmask stage's server time less FedAvg.aggregate_fit (server_aggregate_fit_s, which "
            "Flower then runs on the unmasked average, one copy per finished client): Shamir "
            "reconstruction, PRG unmasking of every finished client's private mask and every dropped "
            "client's pairwise masks, mod, dequantization; server_unmask_stage_s includes it. Bytes: "
            "fedge.records.payload_bytes (protobuf) of each message content; downlink of the "
            "collect-masked-vectors stage carries the global model (float32). Byte counting is left "
            "out of all times. prg_one_vector_s: one pseudo_rand_gen call of num_params int64."
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n=10, 100k params")
    parser.add_argument("--num-clients", type=int, default=100)
    parser.add_argument("--num-params", type=int, default=1_000_000)
    parser.add_argument("--drop-fraction", type=float, default=0.1)
    parser.add_argument("--quantization-range", type=int, default=2**8)
    parser.add_argument("--num-shares", type=int, default=None)
    parser.add_argument("--reconstruction-threshold", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.num_clients, args.num_params = 10, 100_000
    result = flower_secaggplus(
        args.num_clients,
        args.num_params,
        args.drop_fraction,
        args.quantization_range,
        args.seed,
        num_shares=args.num_shares,
        reconstruction_threshold=args.reconstruction_threshold,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
