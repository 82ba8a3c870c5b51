"""The server's export hook: global model -> int8 ONNX -> checked -> signed -> published.

After the rounds ``export-every`` names, the hook exports the global model to fp32
ONNX, quantizes it to int8 with ONNX Runtime (static QDQ calibrated on server-side
training samples, or dynamic), measures both on the server's evaluation split
(accuracy, and latency at 1 thread / batch 1), applies the gate, and signs and
publishes a passing model into the registry. A failure (an operator the exporter or
quantizer cannot handle, a gate miss) is recorded and nothing is published; the
training run goes on either way.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedge.config import RunConfig
from fedge.data import load_dataset
from fedge.deploy.artifacts import (
    ArtifactError,
    build_manifest,
    generate_keypair,
    load_private_key,
    write_artifact,
)
from fedge.deploy.export import (
    ExportError,
    export_onnx,
    file_sha256,
    latency_ms,
    onnx_accuracy,
    quantize_int8,
)
from fedge.deploy.registry import Registry
from fedge.records import (
    ACCURACY_FP32,
    ACCURACY_INT8,
    CONFIG_KEY,
    NUM_EXAMPLES,
    ONNX_ACTION,
    ONNX_FP32,
    ONNX_INT8,
    load_arrays,
)
from fedge.server.loop import RoundEvent, sample_clients

log = logging.getLogger("fedge.server")

ARTIFACTS_LOG = "artifacts.jsonl"
KEYS_DIR = "keys"
# The server's evaluation of an ONNX candidate uses at most this many test samples
# (a seeded subset beyond that): ONNX Runtime at batch 256 does 10k MNIST in ~1 s.
MAX_EVAL_SAMPLES = 10_000


def gate_reasons(
    cfg: RunConfig, accuracy_fp32: float, accuracy_int8: float, latency_ms_p50_int8: float
) -> list[str]:
    """Why the gate refuses a candidate (empty: it passes).

    ``accuracy_fp32 - accuracy_int8`` must not exceed ``export-max-accuracy-drop`` and, when
    ``export-max-latency-ms > 0``, the int8 p50 latency must not exceed it.
    """
    reasons = []
    drop = accuracy_fp32 - accuracy_int8
    if drop > cfg.export_max_accuracy_drop + 1e-12:
        reasons.append(
            f"int8 accuracy {accuracy_int8:.4f} is {drop * 100:.2f} points below fp32 {accuracy_fp32:.4f} "
            f"(export-max-accuracy-drop {cfg.export_max_accuracy_drop})"
        )
    if cfg.export_max_latency_ms > 0 and latency_ms_p50_int8 > cfg.export_max_latency_ms:
        reasons.append(
            f"int8 p50 latency {latency_ms_p50_int8:.3f} ms exceeds export-max-latency-ms "
            f"{cfg.export_max_latency_ms}"
        )
    return reasons


def weighted_accuracies(replies: list[tuple[int, float, float]]) -> tuple[float, float, int]:
    """Example-weighted federated accuracies of the two candidates.

    Parameters
    ----------
    replies : list of (num_examples, accuracy_fp32, accuracy_int8)
        One per client that evaluated both models.

    Returns
    -------
    tuple
        ``(sum n_i a_i / sum n_i`` for fp32, the same for int8, ``sum n_i)``.
    """
    total = sum(n for n, _, _ in replies)
    if total <= 0:
        raise ValueError("no client evaluated the candidate on any example")
    return (
        sum(n * a for n, a, _ in replies) / total,
        sum(n * a for n, _, a in replies) / total,
        total,
    )


def federated_check(
    cfg: RunConfig, grid: Grid, server_round: int, fp32: bytes, int8: bytes
) -> tuple[float, float, int, int]:
    """Send both candidates to a sample of clients; return their weighted accuracies.

    Clients are the ``fraction-evaluate`` share of the connected ones (at least one), or
    ``clients-per-round`` of them when ``fraction-evaluate`` is 0. A client that fails or
    sends a malformed reply is left out, as in training rounds.

    Returns
    -------
    tuple
        ``(accuracy_fp32, accuracy_int8, num_examples, num_clients)``.
    """
    node_ids = list(grid.get_node_ids())
    num = (
        max(1, round(cfg.fraction_evaluate * len(node_ids)))
        if cfg.fraction_evaluate > 0
        else cfg.clients_per_round
    )
    sampled = sample_clients(node_ids, min(num, len(node_ids)), cfg.seed + 2, server_round)
    content = RecordDict({CONFIG_KEY: ConfigRecord({ONNX_FP32: fp32, ONNX_INT8: int8})})
    messages = [
        Message(content, node_id, f"{MessageType.EVALUATE}.{ONNX_ACTION}", group_id=str(server_round))
        for node_id in sampled
    ]
    replies: list[tuple[int, float, float]] = []
    for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout_s):
        if reply.has_error() or len(reply.content.metric_records) != 1:
            reason = reply.error.reason if reply.has_error() else "no MetricRecord"
            log.warning(
                "round %d: int8 check of node %d failed: %s", server_round, reply.metadata.src_node_id, reason
            )
            continue
        metrics = next(iter(reply.content.metric_records.values()))
        values = [metrics.get(k) for k in (NUM_EXAMPLES, ACCURACY_FP32, ACCURACY_INT8)]
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in values) or not values[0] > 0:  # type: ignore[operator]
            log.warning(
                "round %d: int8 check of node %d sent bad metrics %s",
                server_round,
                reply.metadata.src_node_id,
                values,
            )
            continue
        replies.append((int(values[0]), float(values[1]), float(values[2])))  # type: ignore[arg-type]
    if not replies:
        raise ExportError("federated int8 check: no client returned a valid evaluation")
    acc32, acc8, examples = weighted_accuracies(replies)
    return acc32, acc8, examples, len(replies)


class ExportHook:
    """A :class:`~fedge.server.loop.RoundHook` that publishes signed int8 models.

    Parameters
    ----------
    cfg : RunConfig
        ``export-*``, ``signing-key`` and ``registry-dir`` configure it.
    run_dir : Path
        The run folder (default registry ``artifacts/``, default key pair ``keys/``).

    Raises
    ------
    ArtifactError
        If ``signing-key`` is set but missing or unreadable (before round 1).
    """

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        if cfg.signing_key:
            self.key_path = Path(cfg.signing_key)
        else:
            # No key configured: a run-local pair, so a demo run still publishes signed models.
            keys = self.run_dir / KEYS_DIR
            self.key_path = keys / "signing.key"
            if not self.key_path.exists():
                keys.mkdir(parents=True, exist_ok=True)
                generate_keypair(keys)
        self.private_key = load_private_key(self.key_path)
        self.registry = Registry(Path(cfg.registry_dir) if cfg.registry_dir else self.run_dir / "artifacts")
        self._data: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None

    # --- RoundHook ----------------------------------------------------------------

    def on_start(self, first_round: int, num_rounds: int) -> None:
        """Nothing to prepare: data is loaded on the first export."""

    def on_round(self, event: RoundEvent) -> None:
        """Export, check, sign and publish the global model if this round is due."""
        if not self.cfg.exports_after(event.server_round):
            return
        entry = self.export(event)
        with open(self.run_dir / ARTIFACTS_LOG, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        if entry["published"]:
            log.info("round %d: published %s", event.server_round, entry["path"])
        else:
            log.warning("round %d: int8 model not published: %s", event.server_round, entry["reason"])

    def catch_up(self, event: RoundEvent) -> None:
        """On resume: export ``event``'s round if it was due and no attempt was recorded.

        Hooks run after the checkpoint, so a run that died during (or before) the export
        of a round resumes after that round; this keeps its model from going unexported.
        """
        if self.cfg.exports_after(event.server_round) and not any(
            e["round"] == event.server_round for e in self.summary_items()["artifacts"]
        ):
            self.on_round(event)

    def summary_items(self) -> dict[str, Any]:
        """``artifacts``: one entry per export attempt, this run's earlier invocations included."""
        path = self.run_dir / ARTIFACTS_LOG
        entries: dict[int, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                entries[int(entry["round"])] = entry
        return {"artifacts": [entries[r] for r in sorted(entries)]}

    # --- the pipeline -------------------------------------------------------------

    def _eval_data(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if self._data is None:
            cfg = self.cfg
            data = load_dataset(cfg.dataset, cfg.data_dir or None, cfg.seed)
            rng = np.random.default_rng([cfg.seed, 2])
            n_test = len(data.y_test)
            rows = (
                np.arange(n_test)
                if n_test <= MAX_EVAL_SAMPLES
                else np.sort(rng.choice(n_test, MAX_EVAL_SAMPLES, replace=False))
            )
            x_eval, y_eval = np.asarray(data.x_test[rows]), data.y_test[rows]
            calibration = None
            if cfg.export_calibration_samples > 0:
                n_train = len(data.y_train)
                take = min(cfg.export_calibration_samples, n_train)
                calib_rows = np.sort(rng.choice(n_train, take, replace=False))
                calibration = np.asarray(data.x_train[calib_rows])
            self._data = (x_eval, y_eval, calibration)
        return self._data

    def export(self, event: RoundEvent) -> dict[str, Any]:
        """Run the pipeline for one round; return its ``artifacts`` entry."""
        cfg = self.cfg
        start = time.perf_counter()
        # Every key the summary documents is present; None where this attempt has no value.
        entry: dict[str, Any] = {
            "round": event.server_round,
            "path": None,
            "int8_bytes": None,
            "fp32_bytes": None,
            "accuracy_fp32": None,
            "accuracy_int8": None,
            "latency_ms_p50_fp32": None,
            "latency_ms_p50_int8": None,
            "published": False,
        }
        x_eval, y_eval, calibration = self._eval_data()
        with tempfile.TemporaryDirectory(prefix="fedge-export-") as tmp_name:
            tmp = Path(tmp_name)
            try:
                spec = load_dataset(cfg.dataset, cfg.data_dir or None, cfg.seed).spec
                model = cfg.build_model(spec)
                load_arrays(model, event.arrays)
                fp32 = export_onnx(model, spec.input_shape, spec.input_dtype, tmp / "model-fp32.onnx")
                int8 = tmp / "model.onnx"
                source = f"server-train-split:{len(calibration)}" if calibration is not None else "none"
                quant = quantize_int8(fp32, int8, calibration, calibration_source=source)
                metrics = {
                    "accuracy_fp32": onnx_accuracy(fp32, x_eval, y_eval),
                    "accuracy_int8": onnx_accuracy(int8, x_eval, y_eval),
                    "eval_samples": len(y_eval),
                }
                lat32, lat8 = latency_ms(fp32, x_eval[:1]), latency_ms(int8, x_eval[:1])
                metrics.update({f"latency_ms_{k}_fp32": v for k, v in lat32.items()})
                metrics.update({f"latency_ms_{k}_int8": v for k, v in lat8.items()})
                gate_fp32, gate_int8 = metrics["accuracy_fp32"], metrics["accuracy_int8"]
                if cfg.export_federated_eval:
                    acc32, acc8, examples, clients = federated_check(
                        cfg, event.grid, event.server_round, fp32.read_bytes(), int8.read_bytes()
                    )
                    metrics.update(
                        federated_accuracy_fp32=acc32,
                        federated_accuracy_int8=acc8,
                        federated_examples=examples,
                        federated_clients=clients,
                    )
                    # The gate judges the model on the data it will meet on devices.
                    gate_fp32, gate_int8 = acc32, acc8
            except ExportError as err:
                entry.update(reason=str(err), export_s=time.perf_counter() - start)
                return entry
            except Exception as err:  # onnxruntime, disk, ...: recorded, and the run goes on
                log.exception("round %d: export failed", event.server_round)
                entry.update(reason=f"{type(err).__name__}: {err}", export_s=time.perf_counter() - start)
                return entry
            entry.update(
                fp32_bytes=fp32.stat().st_size,
                int8_bytes=int8.stat().st_size,
                accuracy_fp32=metrics["accuracy_fp32"],
                accuracy_int8=metrics["accuracy_int8"],
                latency_ms_p50_fp32=metrics["latency_ms_p50_fp32"],
                latency_ms_p50_int8=metrics["latency_ms_p50_int8"],
            )
            for key in ("federated_accuracy_fp32", "federated_accuracy_int8"):
                if key in metrics:
                    entry[key] = metrics[key]
            reasons = gate_reasons(cfg, gate_fp32, gate_int8, metrics["latency_ms_p50_int8"])
            if reasons:
                entry.update(reason="; ".join(reasons), export_s=time.perf_counter() - start)
                return entry
            manifest = build_manifest(
                server_round=event.server_round,
                files={"model.onnx": int8},
                metrics={**metrics, "fp32_bytes": entry["fp32_bytes"], "fp32_sha256": file_sha256(fp32)},
                quantization=asdict(quant),
                parent=self.registry.current(),
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            )
            # Staged inside the registry's folder so that publishing is one rename.
            self.registry.root.mkdir(parents=True, exist_ok=True)
            staged = self.registry.root / f".staging-{event.server_round:04d}-{os.getpid()}"
            shutil.rmtree(staged, ignore_errors=True)
            try:
                write_artifact(staged, {"model.onnx": int8.read_bytes()}, manifest, self.private_key)
                version = self.registry.publish(staged)
            except (ArtifactError, OSError) as err:
                entry.update(reason=str(err), export_s=time.perf_counter() - start)
                return entry
            finally:
                # Published: renamed away already; failed: never left behind in the registry.
                shutil.rmtree(staged, ignore_errors=True)
        entry.update(
            path=str(self.registry.path(version)), published=True, export_s=time.perf_counter() - start
        )
        return entry
