"""Run a simulated federation on one machine, on fedge's engine or Flower's Ray engine."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedge.config import ConfigError, RunConfig
from fedge.server.app import make_server_app, run_federation
from fedge.server.checkpoint import CHECKPOINT_FILE
from fedge.server.loop import RoundHook
from fedge.server.run_folder import SUMMARY_FILE, default_run_dir
from fedge.simulation.grid import InProcessGrid, default_workers

log = logging.getLogger("fedge.simulation")

# Per-client state folders inside the run folder (in-process engine).
CLIENT_STATE_DIR = "clients"
# The ClientApp every simulated client runs; it reads the run config from its Context.
CLIENT_APP_REF = "fedge.client.app:app"
# What a client imports on its first message, loaded once in the fork server instead:
# the optimizer's lazy torch._dynamo import, scikit-learn and HF datasets are ~1-2 s each.
WORKER_PRELOAD = ("torch._dynamo", "datasets", "flwr_datasets.partitioner", "fedge.client.app")


def worker_preload(cfg: RunConfig) -> tuple[str, ...]:
    """Modules the workers of ``cfg`` will import; scikit-learn only where the loader uses it."""
    extra = ("sklearn.datasets", "sklearn.model_selection") if cfg.dataset == "digits" else ()
    return WORKER_PRELOAD + extra


def simulate(
    cfg: RunConfig,
    run_dir: Path | None = None,
    *,
    resume: bool = False,
    hooks: Sequence[RoundHook] = (),
) -> dict[str, Any]:
    """Run ``cfg`` as a simulation and return its ``summary.json`` document.

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
        If ``run_dir`` already holds a run and ``resume`` is false.
    """
    started_at = time.perf_counter()
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    has_checkpoint = (run_dir / CHECKPOINT_FILE).is_file()
    if has_checkpoint and not resume:
        raise ConfigError(
            f"run folder {run_dir} already holds a run; pass --resume {run_dir} to continue it "
            "or choose another --out"
        )
    if resume and not has_checkpoint:
        raise ConfigError(
            f"no checkpoint in {run_dir}; --resume needs the folder of a run that completed a round"
        )
    workers = cfg.workers or default_workers()
    if cfg.engine == "inprocess":
        with InProcessGrid(
            CLIENT_APP_REF,
            cfg.num_clients,
            cfg.to_mapping(),
            workers=workers,
            preload=worker_preload(cfg),
            # Client state that must survive a --resume (the error-feedback residual).
            client_state_dir=run_dir / CLIENT_STATE_DIR,
        ) as grid:
            return run_federation(grid, cfg, run_dir, resume=resume, hooks=hooks, started_at=started_at)
    return _simulate_ray(cfg, run_dir, resume=resume, hooks=hooks, workers=workers)


def _simulate_ray(
    cfg: RunConfig, run_dir: Path, *, resume: bool, hooks: Sequence[RoundHook], workers: int
) -> dict[str, Any]:
    """Flower's own simulation engine: ``run_simulation`` on a local Ray cluster."""
    # Ray warns on every start that it will stop overriding accelerator variables for
    # num_gpus=0; opting in to that behaviour now is what fedge wants anyway (CPU clients).
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    from fedge.client.app import make_client_app

    run_simulation(
        server_app=make_server_app(cfg, run_dir, resume=resume, hooks=hooks),
        # Ray hands apps an empty run_config, so both close over the resolved config.
        client_app=make_client_app(cfg),
        num_supernodes=cfg.num_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": workers, "num_gpus": 0, "include_dashboard": False},
        },
    )
    summary_path = run_dir / SUMMARY_FILE
    if not summary_path.is_file():
        raise RuntimeError(f"the Ray engine finished without writing {summary_path}; see the log above")
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    return summary
