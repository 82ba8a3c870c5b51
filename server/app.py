"""fedge's ``ServerApp``: the coordination server's entry point under every engine."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedge.config import RunConfig
from fedge.records import arrays_to_numpy, load_arrays, model_to_arrays
from fedge.server.loop import (
    EvaluateFn,
    RoundEvent,
    RoundHook,
    RoundLoop,
    require_some_round_aggregated,
)
from fedge.server.run_folder import default_run_dir, write_outputs
from fedge.server.run_lock import run_lock
from fedge.server.transport import Federation
from fedge.strategies import build_strategy
from fedge.training import EvalResult, evaluate

log = logging.getLogger("fedge.server")


def central_evaluation(cfg: RunConfig) -> tuple[ArrayRecord, EvaluateFn]:
    """The initial global model and the server-side evaluation on the dataset's test split."""
    data = cfg.federated_data()
    model = cfg.build_model(data.spec)
    initial = model_to_arrays(model)
    x_test, y_test = data.central_test()

    def evaluate_fn(arrays: ArrayRecord) -> EvalResult:
        load_arrays(model, arrays)
        return evaluate(model, x_test, y_test)

    return initial, evaluate_fn


def run_federation(
    grid: Grid,
    cfg: RunConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    hooks: Sequence[RoundHook] = (),
    started_at: float | None = None,
) -> dict[str, Any]:
    """Run (or resume) a federation on ``grid`` and write the run folder; return the summary.

    Parameters
    ----------
    grid : Grid
        Any Flower grid: fedge's in-process one, Flower's simulation or a SuperLink's.
    cfg : RunConfig
        The run's configuration.
    run_dir : Path
        The run folder.
    resume : bool, default False
        Continue from ``run_dir``'s checkpoint instead of round 1.
    hooks : sequence of RoundHook
        Observers called after every round.
    started_at : float, optional
        ``time.perf_counter()`` at the start of the run, for ``summary.json``'s ``wall_s``.

    Raises
    ------
    RunFailedError
        After writing the run folder, when no round aggregated an update.
    """
    started_at = time.perf_counter() if started_at is None else started_at
    initial, evaluate_fn = central_evaluation(cfg)
    all_hooks = list(hooks)
    if cfg.export_every != "off":
        # Built before round 1: a missing signing key must stop the run before it starts.
        from fedge.server.export_hook import ExportHook

        all_hooks.append(ExportHook(cfg, run_dir))
    data = cfg.federated_data()
    loop = RoundLoop(
        cfg,
        build_strategy(cfg),
        initial,
        evaluate_fn,
        run_dir,
        hooks=all_hooks,
        train_settings=cfg.train_settings(data.spec),
        max_examples=cfg.max_examples_per_client or max(data.partition_sizes()),
    )
    if resume:
        done = loop.resume()
        log.info("resuming %s after round %d", run_dir, done)
        if loop.history:
            federation = Federation(grid, loop.transport, cfg.round_timeout_s)
            last = RoundEvent(done, loop.arrays, loop.history[-1], run_dir, grid, federation)
            for hook in all_hooks:
                catch_up = getattr(hook, "catch_up", None)
                if catch_up is not None:
                    catch_up(last)
    history = loop.run(grid)
    extra: dict[str, Any] = {}
    for hook in all_hooks:
        items = getattr(hook, "summary_items", None)
        if items is not None:
            extra.update(items())
    if loop.privacy is not None:
        extra["privacy"] = loop.privacy.report()
    if loop.stop_reason is not None:
        extra["stopped"] = loop.stop_reason
    summary = write_outputs(
        run_dir, cfg, history, arrays_to_numpy(loop.arrays), time.perf_counter() - started_at, extra
    )
    # A run in which nothing worked is a failure, not a success with zero clients.
    require_some_round_aggregated(history, loop.internal_errors)
    return summary


def make_server_app(
    cfg: RunConfig, run_dir: Path, *, resume: bool = False, hooks: Sequence[RoundHook] = ()
) -> ServerApp:
    """A ``ServerApp`` bound to a resolved config (Flower's Ray engine gives apps no run config)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, run_dir, resume=resume, hooks=hooks)

    return server_app


# The app `flwr run` loads (pyproject's [tool.flwr.app.components]): config from the run config.
app = ServerApp()


def log_through_flower() -> None:
    """Send fedge's log records to Flower's handlers (under ``flwr run`` nothing else shows them)."""
    fedge_log = logging.getLogger("fedge")
    if not fedge_log.handlers:
        for handler in logging.getLogger("flwr").handlers:
            fedge_log.addHandler(handler)
        fedge_log.setLevel(logging.INFO)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point under ``flwr run``: parse the run config once, then run the rounds."""
    log_through_flower()
    cfg = RunConfig.from_mapping(context.run_config)
    run_dir = default_run_dir(cfg)
    resume = (run_dir / "checkpoint.safetensors").is_file()
    log.info("fedge run folder: %s%s", run_dir.resolve(), " (resuming)" if resume else "")
    # One run per folder: a second `flwr run` on the same out-dir/run-name is refused.
    with run_lock(run_dir):
        run_federation(grid, cfg, run_dir, resume=resume)
