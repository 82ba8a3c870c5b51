"""Run a simulated federation on one machine, on fedge's engine or Flower's Ray engine."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedge.config import ConfigError, RunConfig
from fedge.data import DataError
from fedge.server.app import make_server_app, run_federation
from fedge.server.checkpoint import CHECKPOINT_FILE, load_checkpoint
from fedge.server.loop import RoundHook
from fedge.server.run_folder import SUMMARY_FILE, default_run_dir
from fedge.server.run_lock import run_lock
from fedge.simulation.grid import InProcessGrid, default_workers

log = logging.getLogger("fedge.simulation")

# Per-client state folders inside the run folder (in-process engine), written by the
# engine's parent process: clients/client-K/state-round-NNNN.pb.
CLIENT_STATE_DIR = "clients"
# Ray's GCS, raylet and agents listen on this address only (not on every interface).
RAY_NODE_IP = "127.0.0.1"
# Ray's switch for its single-machine mode, where every process binds the loopback address.
RAY_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# The ClientApp every simulated client runs; it reads the run config from its Context.
CLIENT_APP_REF = "fedge.client.app:app"
# What a client imports on its first message, loaded once in the fork server instead:
# the optimizer's lazy torch._dynamo import, scikit-learn and HF datasets are ~1-2 s each.
WORKER_PRELOAD = ("torch._dynamo", "datasets", "flwr_datasets.partitioner", "fedge.client.app")


def worker_preload(cfg: RunConfig) -> tuple[str, ...]:
    """Modules the workers of ``cfg`` will import; scikit-learn only where the loader uses it."""
    extra = ("sklearn.datasets", "sklearn.model_selection") if cfg.dataset == "digits" else ()
    return WORKER_PRELOAD + extra


def check_partitions(cfg: RunConfig) -> None:
    """Refuse, before round 1, a split that leaves a client without training data.

    Raises
    ------
    DataError
        If ``num-clients`` exceeds the training samples, or a partition is empty.
    """
    from fedge.data.loaders import load_dataset

    num_samples = int(load_dataset(cfg.dataset, cfg.data_dir or None, cfg.seed).y_train.size)
    if cfg.num_clients > num_samples:
        raise DataError(
            f"num-clients={cfg.num_clients} is more than the {num_samples} training samples of "
            f"{cfg.dataset}, so some clients would have no data; use --num-clients {num_samples} or fewer"
        )
    sizes = cfg.federated_data().partition_sizes()
    empty = [k for k, size in enumerate(sizes) if size == 0]
    if empty:
        shown = ", ".join(str(k) for k in empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise DataError(
            f"num-clients={cfg.num_clients} with partition {cfg.partition!r} leaves {len(empty)} "
            f"client(s) without training data (partition ids {shown}; {num_samples} training "
            "samples in all); use fewer clients or another partition"
        )


def simulate(
    cfg: RunConfig,
    run_dir: Path | None = None,
    *,
    resume: bool = False,
    hooks: Sequence[RoundHook] = (),
) -> dict[str, Any]:
    """Run ``cfg`` as a simulation and return its ``summary.json`` document.

    The run holds the run folder's lock (:func:`fedge.server.run_lock.run_lock`) from
    start to end, so a second run on the same folder is refused.

    Parameters
    ----------
    cfg : RunConfig
        The run's configuration; ``cfg.engine`` picks the engine.
    run_dir : Path, optional
        The run folder (default ``out-dir/run-name``).
    resume : bool, default False
        Continue the run in ``run_dir`` from its checkpoint.
    hooks : sequence of RoundHook
        Observers of every round (progress display, exporters).

    Raises
    ------
    ConfigError
        If ``run_dir`` already holds a run and ``resume`` is false, another run holds
        its lock, or ``num-rounds`` is below the rounds a resumed run already completed.
    DataError
        If a client would have no training data (see :func:`check_partitions`).
    EngineError
        If the in-process engine cannot start any worker process.
    """
    started_at = time.perf_counter()
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    if resume and not (run_dir / CHECKPOINT_FILE).exists():
        raise ConfigError(
            f"no checkpoint in {run_dir}; --resume needs the folder of a run that completed a round"
        )
    with run_lock(run_dir):
        has_checkpoint = (run_dir / CHECKPOINT_FILE).exists()
        if has_checkpoint and not resume:
            raise ConfigError(
                f"run folder {run_dir} already holds a run; pass --resume {run_dir} to continue it "
                "or choose another --out"
            )
        if resume and not has_checkpoint:
            raise ConfigError(
                f"no checkpoint in {run_dir}; --resume needs the folder of a run that completed a round"
            )
        resume_round = load_checkpoint(run_dir).server_round if resume else 0
        if cfg.num_rounds < resume_round:
            raise ConfigError(
                f"num-rounds={cfg.num_rounds} is below the {resume_round} rounds {run_dir} already "
                f"completed; pass --num-rounds {resume_round} or more to continue it"
            )
        workers = cfg.workers or default_workers()
        if cfg.engine == "inprocess":
            with InProcessGrid(
                CLIENT_APP_REF,
                cfg.num_clients,
                cfg.to_mapping(),
                workers=workers,
                preload=worker_preload(cfg),
                # The parent keeps each client's state here, for --resume (the
                # error-feedback residual); a resumed run starts from the checkpoint's round.
                client_state_dir=run_dir / CLIENT_STATE_DIR,
                resume_round=resume_round,
                node_config=_device_node_config(cfg, run_dir),
            ) as grid:
                # The workers start in the background meanwhile.
                check_partitions(cfg)
                return run_federation(grid, cfg, run_dir, resume=resume, hooks=hooks, started_at=started_at)
        check_partitions(cfg)
        return _simulate_ray(cfg, run_dir, resume=resume, hooks=hooks, workers=workers)


def _device_node_config(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """What every simulated device is started with, as a SuperNode's ``--node-config``.

    With ``export-federated-eval``, the public key the clients pin to verify the signed
    int8 candidate before they load it (a device loads only verified models).
    """
    if not cfg.export_federated_eval:
        return {}
    from fedge.client.onnx_check import PUBLIC_KEY_NODE_CONFIG
    from fedge.server.export_hook import public_key_path

    return {PUBLIC_KEY_NODE_CONFIG: str(public_key_path(cfg, run_dir).resolve())}


def _simulate_ray(
    cfg: RunConfig, run_dir: Path, *, resume: bool, hooks: Sequence[RoundHook], workers: int
) -> dict[str, Any]:
    """Flower's own simulation engine: ``run_simulation`` on a local Ray cluster."""
    # Ray warns on every start that it will stop overriding accelerator variables for
    # num_gpus=0; opting in to that behaviour now is what fedge wants anyway (CPU clients).
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Ray binds GCS, raylet and its agents to the node's routable address (it rewrites a
    # `_node_ip_address` of 127.0.0.1 to that address), so anyone on the network can reach
    # them. Its single-machine mode (the default on macOS and Windows) uses the loopback
    # address instead; this flag is read when ray is imported, and Ray's processes
    # inherit it.
    os.environ[RAY_LOCAL_ONLY_ENV] = "0"
    if "ray" in sys.modules:
        from ray._private import ray_constants  # the flag above is read at import

        if ray_constants.ENABLE_RAY_CLUSTER:
            raise ConfigError(
                "ray was imported before fedge's Ray engine could keep it on 127.0.0.1; "
                f"set {RAY_LOCAL_ONLY_ENV}=0 in the environment, or run the simulation in a fresh process"
            )
    from flwr.simulation import run_simulation

    from fedge.client.app import make_client_app

    run_simulation(
        server_app=make_server_app(cfg, run_dir, resume=resume, hooks=hooks),
        # Ray hands apps an empty run_config, so both close over the resolved config.
        client_app=make_client_app(cfg),
        num_supernodes=cfg.num_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": workers,
                "num_gpus": 0,
                "include_dashboard": False,
                # Otherwise GCS, raylet and the agents listen on every interface.
                "_node_ip_address": RAY_NODE_IP,
            },
        },
    )
    summary_path = run_dir / SUMMARY_FILE
    if not summary_path.is_file():
        raise RuntimeError(f"the Ray engine finished without writing {summary_path}; see the log above")
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    return summary
