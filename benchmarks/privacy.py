"""Benchmark: privacy against utility, fedge's central DP and on-device DP-SGD (issue 10).

One workload (defaults: MNIST, Dirichlet 0.5, 500 clients, Poisson client sampling with 50
expected a round, 10 rounds, one local epoch, ``fedge simulate`` defaults otherwise), run
once without privacy and then, for each target epsilon in {1, 4, 8} at delta 1e-5:

``central``
    ``dp = "central"``, ``client-sampling = "poisson"``, RDP accountant, ``clip-norm``
    ``CLIP_NORM``: the noise multiplier is :func:`fedge.privacy.accounting.calibrate`'s for
    the run's rounds and sample rate ``clients-per-round / num-clients`` (user-level
    epsilon, trusted server).
``dp-sgd``
    ``dp-sgd = true`` (Opacus, sample-level epsilon of each device's own data), Poisson
    client sampling, no central noise: the noise multiplier is Opacus's
    ``get_noise_multiplier`` for a device of the mean partition size that takes part in
    ``K`` rounds, ``K`` the 95th percentile of Binomial(rounds, sample rate); the device
    budget ``dp-sgd-target-epsilon`` is the target, so a device picked more often than that
    (or with fewer examples) is refused rather than going past it.

Each row: final accuracy, its distance from the non-private run, the epsilon reached (the
accountant's after the last round; for DP-SGD the largest device epsilon, ``dp_sgd_epsilon_max``),
the noise multiplier, and bits per parameter up: ``bytes_up_total * 8 / (params *
client-rounds)`` (Flower's protobuf serialization of each reply). ``epsilon_8_within_3_points``
says whether the epsilon-8 run came within 3 points of the non-private one. Prints one JSON
object (a Markdown table on stderr).

    make bench                                   # or: python benchmarks/privacy.py
    python benchmarks/privacy.py --mechanisms central --epsilons 8
    python benchmarks/privacy.py --quick         # digits, 20 clients, 3 rounds, epsilon 8: a smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from fedge.config import RunConfig
from fedge.privacy.accounting import calibrate
from fedge.simulation.runner import simulate

DELTA = 1e-5
EPSILONS = (1.0, 4.0, 8.0, math.inf)
MECHANISMS = ("central", "dp-sgd")
CLIP_NORM = 1.0
DP_SGD_MAX_GRAD_NORM = 1.0
WITHIN_POINTS = 3.0
_DATA_DIR = str(Path(__file__).resolve().parents[2] / "shared" / "datasets")
WORKLOAD: dict[str, Any] = {
    "dataset": "mnist",
    "partition": "dirichlet:0.5",
    "num-clients": 500,
    "clients-per-round": 50,
    "num-rounds": 10,
    "local-epochs": 1,
    "client-sampling": "poisson",
    "target-delta": DELTA,
    "export-every": "off",
    "seed": 42,
}
QUICK_WORKLOAD: dict[str, Any] = {
    **WORKLOAD,
    "dataset": "digits",
    "num-clients": 20,
    "clients-per-round": 5,
    "num-rounds": 3,
}


def _data_dir() -> str:
    return os.environ.get("FEDGE_DATA_DIR") or _DATA_DIR


def _participations(rounds: int, q: float, quantile: float = 0.95) -> int:
    """The ``quantile`` of Binomial(rounds, q): how many rounds a device is planned for."""
    total = 0.0
    for k in range(rounds + 1):
        total += math.comb(rounds, k) * q**k * (1 - q) ** (rounds - k)
        if total >= quantile:
            return max(k, 1)
    return rounds


def dp_sgd_noise(cfg: RunConfig, target_epsilon: float) -> dict[str, Any]:
    """Opacus's noise multiplier for a mean-sized device in the 95th-percentile number of rounds."""
    from opacus.accountants.utils import get_noise_multiplier

    from fedge.training import dp_sgd_plan

    data = cfg.federated_data()
    sizes = data.partition_sizes()
    training = data.spec.training
    batch = cfg.batch_size if isinstance(cfg.batch_size, int) else training.batch_size
    epochs = cfg.local_epochs if isinstance(cfg.local_epochs, int) else training.local_epochs
    mean_size = max(1, round(sum(sizes) / len(sizes)))
    plan = dp_sgd_plan(mean_size, epochs=epochs, batch_size=batch)
    q = cfg.clients_per_round / cfg.num_clients
    k = _participations(cfg.num_rounds, q)
    z = get_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=cfg.target_delta,
        sample_rate=plan.sample_rate,
        steps=plan.steps * k,
        accountant="rdp",
    )
    return {
        "noise_multiplier": float(z),
        "planned_rounds_per_device": k,
        "mean_partition": mean_size,
        "local_sample_rate": plan.sample_rate,
        "local_steps_per_round": plan.steps,
    }


def run_one(workload: dict[str, Any], mechanism: str, epsilon: float, out: Path) -> dict[str, Any]:
    """One run: ``mechanism`` at ``epsilon`` (inf: no privacy); the row's figures."""
    values = {**workload, "data-dir": _data_dir()}
    rounds = int(values["num-rounds"])
    q = values["clients-per-round"] / values["num-clients"]
    row: dict[str, Any] = {"target_epsilon": None if math.isinf(epsilon) else epsilon}
    if not math.isinf(epsilon):
        if mechanism == "central":
            z = calibrate(epsilon, DELTA, rounds, q, kind="rdp", sampling="poisson")
            values.update(
                {"dp": "central", "accountant": "rdp", "clip-norm": CLIP_NORM, "noise-multiplier": z}
            )
            row["noise_multiplier"] = round(z, 4)
        else:
            plan = dp_sgd_noise(RunConfig.from_mapping(values), epsilon)
            values.update(
                {
                    "dp-sgd": True,
                    "dp-sgd-noise-multiplier": plan["noise_multiplier"],
                    "dp-sgd-max-grad-norm": DP_SGD_MAX_GRAD_NORM,
                    "dp-sgd-target-epsilon": epsilon,
                }
            )
            row["noise_multiplier"] = round(plan["noise_multiplier"], 4)
            row["dp_sgd_plan"] = plan
    else:
        row["noise_multiplier"] = 0.0
    cfg = RunConfig.from_mapping(values)
    tag = "none" if math.isinf(epsilon) else f"{mechanism}-{epsilon:g}"
    summary = simulate(cfg, out / tag)
    history = summary["history"]
    client_rounds = sum(r["clients"] for r in history)
    params = sum(p.numel() for p in cfg.build_model(cfg.federated_data().spec).parameters())
    reached: float | None = None
    if not math.isinf(epsilon):
        if mechanism == "central":
            reached = (summary.get("privacy") or {}).get("epsilon")
        else:
            per_round = [(r.get("privacy") or {}).get("dp_sgd_epsilon_max") for r in history]
            known = [e for e in per_round if e is not None]
            reached = max(known) if known else None
    row.update(
        {
            "final_accuracy": round(float(summary["final"]["accuracy"]), 4),
            "epsilon": None if reached is None else round(float(reached), 3),
            "bits_per_param_up": round(8 * sum(r["bytes_up"] for r in history) / (params * client_rounds), 3)
            if client_rounds
            else None,
            "client_rounds": client_rounds,
            "rounds_run": len(history),
            "stopped": summary.get("stopped"),
            "wall_s": round(float(summary["wall_s"]), 1),
            "parameters": params,
        }
    )
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| mechanism | target epsilon | epsilon reached | noise multiplier | final accuracy "
        "| vs non-private (points) | bits / param up |\n|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['mechanism']} | {r['target_epsilon'] if r['target_epsilon'] is not None else 'inf'} "
        f"| {r['epsilon']} | {r['noise_multiplier']} | {r['final_accuracy']:.4f} "
        f"| {r['accuracy_delta_points']:+.2f} | {r['bits_per_param_up']} |"
        for r in rows
    ]
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the table and print one JSON object (a Markdown table on stderr)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, 20 clients, 3 rounds")
    parser.add_argument("--mechanisms", nargs="+", choices=MECHANISMS, default=list(MECHANISMS))
    parser.add_argument("--epsilons", nargs="+", type=float, default=None, help="default 1 4 8 (--quick: 8)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--clip-norm", type=float, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    logging.getLogger("fedge").setLevel(logging.WARNING)
    workload = dict(QUICK_WORKLOAD if args.quick else WORKLOAD)
    if args.rounds:
        workload["num-rounds"] = args.rounds
    if args.clip_norm:
        global CLIP_NORM
        CLIP_NORM = args.clip_norm
    chosen = args.epsilons or ([8.0] if args.quick else list(EPSILONS))
    epsilons = [e for e in chosen if not math.isinf(e)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = run_one(workload, "none", math.inf, Path(tmp))
        base["mechanism"] = "none"
        rows.append(base)
        for mechanism in args.mechanisms:
            for epsilon in epsilons:
                row = run_one(workload, mechanism, epsilon, Path(tmp))
                row["mechanism"] = mechanism
                rows.append(row)
    for r in rows:
        r["accuracy_delta_points"] = round(100 * (r["final_accuracy"] - base["final_accuracy"]), 2)
    within: dict[str, Any] = {}
    for mechanism in args.mechanisms:
        at8 = [r for r in rows if r["mechanism"] == mechanism and r["target_epsilon"] == 8.0]
        if at8:
            r = at8[0]
            within[mechanism] = {
                "met": r["accuracy_delta_points"] >= -WITHIN_POINTS,
                "accuracy_delta_points": r["accuracy_delta_points"],
                "took": {
                    "clients_per_round": workload["clients-per-round"],
                    "num_clients": workload["num-clients"],
                    "num_rounds": workload["num-rounds"],
                    "noise_multiplier": r["noise_multiplier"],
                    ("clip_norm" if mechanism == "central" else "dp_sgd_max_grad_norm"): (
                        CLIP_NORM if mechanism == "central" else DP_SGD_MAX_GRAD_NORM
                    ),
                },
            }
    print(_table(rows), file=sys.stderr)
    report = {
        "workload": workload,
        "delta": DELTA,
        "clip_norm": CLIP_NORM,
        "dp_sgd_max_grad_norm": DP_SGD_MAX_GRAD_NORM,
        "sample_rate": workload["clients-per-round"] / workload["num-clients"],
        "parameters": base["parameters"],
        "rows": rows,
        "epsilon_8_within_3_points": within,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
