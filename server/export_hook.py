"""The server's export hook: global model -> int8 ONNX -> checked -> signed -> published.

After the rounds ``export-every`` names, the hook exports the global model to fp32
ONNX, quantizes it to int8 with ONNX Runtime (static QDQ calibrated on server-side
training samples, or dynamic), measures both on the server's evaluation split
(accuracy, and latency at 1 thread / batch 1), applies the gate, and signs and
publishes a passing model into the registry. A failure (an operator the exporter or
quantizer cannot handle, a gate miss) is recorded and nothing is published; the
training run goes on either way.

Every manifest names the run (:func:`run_id`, kept in the run folder), the model and
a release number taken from the signing key's counter (``<signing-key>.releases``,
:class:`~fedge.deploy.registry.ReleaseCounter`): one above the newest handed out with
that key by any run, and above the registry's newest. The federated int8 check
(``export-federated-eval``) sends clients a signed candidate manifest
(``"candidate": true``) with the two models; a client verifies it with its pinned key
(``node_config["public-key"]``, the path :func:`public_key_path` returns) before it
loads a byte. The gate then judges the clients' replies robustly (:func:`federated_gate`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedge.config import RunConfig
from fedge.data import load_dataset
from fedge.deploy.artifacts import (
    CANDIDATE_FP32_FILE,
    CANDIDATE_MANIFEST,
    CANDIDATE_SIGNATURE,
    KEY_FILES,
    KEY_METRICS,
    KEY_RUN_ID,
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    MODEL_FILE,
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    ArtifactError,
    build_manifest,
    canonical_json,
    generate_keypair,
    load_private_key,
    read_regular,
    sign,
    version_name,
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
from fedge.deploy.registry import Registry, ReleaseCounter
from fedge.records import (
    ACCURACY_FP32,
    ACCURACY_INT8,
    CONFIG_KEY,
    NUM_EXAMPLES,
    ONNX_ACTION,
    ONNX_FP32,
    ONNX_INT8,
    SERVER_ROUND,
    load_arrays,
)
from fedge.rng import Stream, stream_rng
from fedge.server.loop import RoundEvent
from fedge.server.transport import INT8_CHECK, Federation, PlainTransport, sample_clients

log = logging.getLogger("fedge.server")

ARTIFACTS_LOG = "artifacts.jsonl"
KEYS_DIR = "keys"
#: The run folder's file holding the run id (32 hex digits and a newline).
RUN_ID_FILE = "run-id"
#: The most examples one client may report in the federated int8 check. Every built-in
#: dataset's partitions hold a few thousand test samples at most; a reply above this is
#: a lie or a bug, and is left out (it would otherwise outweigh every honest client).
MAX_CHECK_EXAMPLES = 100_000
#: Below this many valid replies the gate takes the largest per-client drop (a liar can
#: only make it refuse); from it on, the median (one liar cannot move it past the
#: honest clients' values).
MIN_CLIENTS_FOR_MEDIAN = 3
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


def federated_gate_reasons(cfg: RunConfig, check: FederatedCheck, latency_ms_p50_int8: float) -> list[str]:
    """Why the gate refuses a candidate the clients checked: :attr:`FederatedCheck.drop`, then latency."""
    reasons = []
    if check.drop > cfg.export_max_accuracy_drop + 1e-12:
        rule = "median" if check.clients >= MIN_CLIENTS_FOR_MEDIAN else "largest"
        reasons.append(
            f"the {rule} per-client int8 drop over {check.clients} clients is {check.drop * 100:.2f} points "
            f"(export-max-accuracy-drop {cfg.export_max_accuracy_drop})"
        )
    # Accuracy 0 against 0: only the latency bound speaks.
    return reasons + gate_reasons(cfg, 0.0, 0.0, latency_ms_p50_int8)


def run_id(run_dir: Path) -> str:
    """The run's id: 32 random hex digits made once per run folder and kept in it.

    The first call writes ``run_dir/run-id`` (exclusively: two racing calls agree on
    one id); a resumed run reads the same id back. It names the run in every manifest,
    so two runs that share a signing key never pass for one another.

    Raises
    ------
    ArtifactError
        If ``run-id`` exists but does not hold an id (the message names the file).
    """
    run_dir = Path(run_dir)
    path = run_dir / RUN_ID_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(16) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    try:
        text = read_regular(path, 64).decode("ascii", "replace").strip()
    except FileNotFoundError:
        raise ArtifactError(f"{path} vanished; check who else writes to {run_dir}") from None
    if len(text) != 32 or any(c not in "0123456789abcdef" for c in text):
        raise ArtifactError(f"{path} does not hold a run id (32 hex digits); remove it to make a new one")
    return text


def signing_key_paths(cfg: RunConfig, run_dir: Path) -> tuple[Path, Path]:
    """The private and public key a run signs with.

    ``signing-key`` and the ``.pub`` beside it (``keys/signing.key`` ->
    ``keys/signing.pub``, as ``fedge keys new`` writes them), or, when ``signing-key``
    is empty, the run-local pair ``run_dir/keys/signing.key`` and ``signing.pub``.
    """
    if cfg.signing_key:
        private = Path(cfg.signing_key)
        return private, private.with_suffix(".pub")
    keys = Path(run_dir) / KEYS_DIR
    return keys / PRIVATE_KEY_FILE, keys / PUBLIC_KEY_FILE


def public_key_path(cfg: RunConfig, run_dir: Path) -> Path:
    """The public key clients pin for the run's federated int8 check: ``node_config["public-key"]``.

    An engine gives every client this path (see :func:`signing_key_paths`); the file
    exists once :class:`ExportHook` is built (before round 1).
    """
    return signing_key_paths(cfg, run_dir)[1]


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


def check_reply_metrics(num_examples: object, accuracy_fp32: object, accuracy_int8: object) -> str | None:
    """Why a client's federated-check reply is refused, or None if it is valid.

    ``num_examples`` must be an int (not bool, not float) in ``[1, MAX_CHECK_EXAMPLES]``;
    both accuracies finite numbers in ``[0, 1]``.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, int):
        return f"num-examples {num_examples!r} is not an integer"
    if not 1 <= num_examples <= MAX_CHECK_EXAMPLES:
        return f"num-examples {num_examples} is outside [1, {MAX_CHECK_EXAMPLES}]"
    for name, value in (("accuracy-fp32", accuracy_fp32), ("accuracy-int8", accuracy_int8)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return f"{name} {value!r} is not a finite number"
        if not 0.0 <= value <= 1.0:
            return f"{name} {value!r} is outside [0, 1]"
    return None


@dataclass(frozen=True)
class FederatedCheck:
    """What the federated int8 check measured.

    Attributes
    ----------
    accuracy_fp32, accuracy_int8 : float
        Example-weighted accuracies over the valid replies (reported, not gated).
    drop : float
        The gated int8 drop: the median of the per-client drops
        ``accuracy_fp32_i - accuracy_int8_i`` with at least ``MIN_CLIENTS_FOR_MEDIAN``
        valid replies, their maximum below that.
    examples, clients : int
        Examples and clients of the valid replies.
    """

    accuracy_fp32: float
    accuracy_int8: float
    drop: float
    examples: int
    clients: int


def federated_gate(replies: list[tuple[int, float, float]]) -> FederatedCheck:
    """Aggregate valid federated-check replies (see :func:`check_reply_metrics`) robustly.

    The gated drop is per client, so a client's weight cannot matter: with ``k >= 3``
    replies it is ``median_i(a32_i - a8_i)``, which one liar cannot push beyond the
    range of the honest clients' drops; with 1 or 2 replies it is ``max_i``, so a liar
    can make the gate refuse but never pass. Example weights (bounded by
    ``MAX_CHECK_EXAMPLES``) only enter the reported accuracies.

    Raises
    ------
    ValueError
        If ``replies`` is empty.
    """
    if not replies:
        raise ValueError("no client evaluated the candidate")
    acc32, acc8, examples = weighted_accuracies(replies)
    drops = [a32 - a8 for _, a32, a8 in replies]
    drop = float(np.median(drops)) if len(drops) >= MIN_CLIENTS_FOR_MEDIAN else max(drops)
    return FederatedCheck(acc32, acc8, drop, examples, len(replies))


def federated_check(
    cfg: RunConfig, clients: Federation | Grid, server_round: int, candidate: dict[str, bytes]
) -> FederatedCheck:
    """Send the signed candidate to a sample of clients; return their robust aggregate.

    Clients are the ``fraction-evaluate`` share of the connected ones (at least one), or
    ``clients-per-round`` of them when ``fraction-evaluate`` is 0. A client that fails,
    sends a malformed reply, or reports values :func:`check_reply_metrics` refuses is
    left out, with a warning.

    Parameters
    ----------
    clients : Federation or Grid
        The run's clients; the check goes through the run's transport (a bare grid gets
        the plain one). The sample comes from the named stream ``INT8_CHECK_SAMPLING``.
    candidate : dict of str to bytes
        The ConfigRecord's values: the candidate manifest, its signature, and the fp32
        and int8 model bytes (:meth:`ExportHook.sign_candidate`).

    Raises
    ------
    ExportError
        If no client returned a valid evaluation.
    """
    federation = (
        clients
        if isinstance(clients, Federation)
        else Federation(clients, PlainTransport(), cfg.round_timeout_s)
    )
    node_ids = federation.node_ids()
    num = (
        max(1, round(cfg.fraction_evaluate * len(node_ids)))
        if cfg.fraction_evaluate > 0
        else cfg.clients_per_round
    )
    sampled = sample_clients(
        node_ids, min(num, len(node_ids)), cfg.seed, server_round, Stream.INT8_CHECK_SAMPLING
    )
    # What the client needs to load its test data, and the signed candidate.
    config = ConfigRecord({SERVER_ROUND: server_round, **cfg.client_settings(), **candidate})
    content = RecordDict({CONFIG_KEY: config})
    messages = [
        Message(content, node_id, f"{MessageType.EVALUATE}.{ONNX_ACTION}", group_id=str(server_round))
        for node_id in sampled
    ]
    replies: list[tuple[int, float, float]] = []
    seen: set[int] = set()
    for reply in federation.exchange(messages, server_round, INT8_CHECK, config).replies:
        node = reply.metadata.src_node_id
        if node in seen or node not in sampled:
            log.warning("round %d: int8 check left out an extra reply from node %d", server_round, node)
            continue  # one vote per client asked
        seen.add(node)
        if reply.has_error() or len(reply.content.metric_records) != 1:
            reason = reply.error.reason if reply.has_error() else "no MetricRecord"
            log.warning("round %d: int8 check of node %d failed: %s", server_round, node, reason)
            continue
        metrics = next(iter(reply.content.metric_records.values()))
        values = [metrics.get(k) for k in (NUM_EXAMPLES, ACCURACY_FP32, ACCURACY_INT8)]
        problem = check_reply_metrics(*values)
        if problem is not None:
            log.warning("round %d: int8 check of node %d left out: %s", server_round, node, problem)
            continue
        replies.append((int(values[0]), float(values[1]), float(values[2])))
    if not replies:
        raise ExportError(
            "federated int8 check: no client returned a valid evaluation (each client needs "
            'node_config["public-key"], the run\'s signing.pub)'
        )
    return federated_gate(replies)


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
        If ``signing-key`` is set but missing or unreadable, or its release counter
        (``<signing-key>.releases``) cannot be locked, read or written (before round 1).
    """

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.key_path, self.public_key_path = signing_key_paths(cfg, self.run_dir)
        if not cfg.signing_key and not self.key_path.exists():
            # No key configured: a run-local pair, so a demo run still publishes signed models.
            self.key_path.parent.mkdir(parents=True, exist_ok=True)
            generate_keypair(self.key_path.parent)
        self.private_key = load_private_key(self.key_path)
        if cfg.export_federated_eval and not self.public_key_path.is_file():
            raise ArtifactError(
                f"export-federated-eval needs the public key beside signing-key, {self.public_key_path}, "
                "which clients pin; keep the pair `fedge keys new` wrote together"
            )
        self.run_id = run_id(self.run_dir)
        self.registry = Registry(Path(cfg.registry_dir) if cfg.registry_dir else self.run_dir / "artifacts")
        # Releases grow per signing key, across every run and registry that shares it.
        self.releases = ReleaseCounter(self.key_path)
        self.releases.check()
        self._data: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None

    # --- RoundHook ----------------------------------------------------------------

    def on_start(self, first_round: int, num_rounds: int) -> None:
        """Nothing to prepare: data is loaded on the first export."""

    def on_round(self, event: RoundEvent) -> None:
        """Export, check, sign and publish the global model if this round is due."""
        if not self.cfg.exports_after(event.server_round):
            return
        if not event.record.aggregated:
            # Its model is an earlier round's (or the untrained one): never publish it as this round.
            entry = self.skipped_entry(event.server_round, "the round did not aggregate an update")
        else:
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
        The registry is the source of truth: a version of this run found there (the run
        died after publishing, before its ``artifacts.jsonl`` line) is recorded as
        published from its manifest, not exported again, and ``current`` is moved to it
        if the crash came before the pointer moved.
        """
        if not self.cfg.exports_after(event.server_round):
            return
        if any(e["round"] == event.server_round for e in self._logged_entries()):
            return
        version = version_name(event.server_round)
        recovered = self._registry_entry(version)
        if recovered is None:
            self.on_round(event)
            return
        if (
            self.registry.current() != version
            and self.registry.next_release() - 1 == self.registry.release_of(version)
        ):
            self.registry.set_current(version)
        with open(self.run_dir / ARTIFACTS_LOG, "a") as fh:
            fh.write(json.dumps(recovered) + "\n")
        log.info(
            "round %d: %s was published before the crash; recorded from the registry",
            event.server_round,
            version,
        )

    def _logged_entries(self) -> list[dict[str, Any]]:
        path = self.run_dir / ARTIFACTS_LOG
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _registry_entry(self, version: str) -> dict[str, Any] | None:
        """The ``artifacts`` entry of a version of this run found in the registry, or None."""
        if version not in self.registry.versions():
            return None
        folder = self.registry.path(version)
        try:
            manifest = json.loads(read_regular(folder / MANIFEST_FILE, MAX_MANIFEST_BYTES))
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(manifest, dict) or manifest.get(KEY_RUN_ID) != self.run_id:
            return None  # another run's version under the same name: not ours to claim
        metrics = manifest.get(KEY_METRICS, {})
        return {
            "round": int(manifest["round"]),
            "path": str(folder),
            "int8_bytes": manifest.get(KEY_FILES, {}).get(MODEL_FILE, {}).get("bytes"),
            "fp32_bytes": metrics.get("fp32_bytes"),
            "accuracy_fp32": metrics.get("accuracy_fp32"),
            "accuracy_int8": metrics.get("accuracy_int8"),
            "latency_ms_p50_fp32": metrics.get("latency_ms_p50_fp32"),
            "latency_ms_p50_int8": metrics.get("latency_ms_p50_int8"),
            "published": True,
            "recovered_from_registry": True,
        }

    def summary_items(self) -> dict[str, Any]:
        """``artifacts``: one entry per export attempt, this run's earlier invocations included.

        An entry that says ``published: false`` for a round whose version of this run is
        in the registry is corrected from the registry, which is the source of truth.
        """
        entries: dict[int, dict[str, Any]] = {}
        for entry in self._logged_entries():
            entries[int(entry["round"])] = entry
        for server_round, entry in entries.items():
            if not entry.get("published"):
                recovered = self._registry_entry(version_name(server_round))
                if recovered is not None:
                    entries[server_round] = recovered
        return {"artifacts": [entries[r] for r in sorted(entries)]}

    def sign_candidate(
        self,
        server_round: int,
        fp32: bytes,
        int8: bytes,
        metrics: dict[str, Any],
        quantization: dict[str, Any],
    ) -> dict[str, bytes]:
        """The federated check's signed candidate: a manifest with ``"candidate": true``.

        Returns
        -------
        dict of str to bytes
            The message's ConfigRecord values: the manifest bytes, their signature and
            both models (``model.fp32.onnx`` and ``model.onnx`` in the manifest).
        """
        manifest = build_manifest(
            server_round=server_round,
            files={CANDIDATE_FP32_FILE: fp32, MODEL_FILE: int8},
            metrics=metrics,
            quantization=quantization,
            parent=self.registry.current(),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            run_id=self.run_id,
            model=self._model_name(),
            # Informative only (a candidate is never installed): peeked, not taken.
            release=self.releases.peek(self.registry.next_release() - 1),
            candidate=True,
        )
        manifest_bytes = canonical_json(manifest)
        return {
            CANDIDATE_MANIFEST: manifest_bytes,
            CANDIDATE_SIGNATURE: sign(self.private_key, manifest_bytes),
            ONNX_FP32: fp32,
            ONNX_INT8: int8,
        }

    def _model_name(self) -> str:
        spec = load_dataset(self.cfg.dataset, self.cfg.data_dir or None, self.cfg.seed).spec
        return self.cfg.resolved_model(spec.default_model)

    # --- the pipeline -------------------------------------------------------------

    def _eval_data(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if self._data is None:
            cfg = self.cfg
            data = load_dataset(cfg.dataset, cfg.data_dir or None, cfg.seed)
            n_test = len(data.y_test)
            rows = (
                np.arange(n_test)
                if n_test <= MAX_EVAL_SAMPLES
                else np.sort(
                    stream_rng(cfg.seed, Stream.EXPORT_EVALUATION).choice(
                        n_test, MAX_EVAL_SAMPLES, replace=False
                    )
                )
            )
            x_eval, y_eval = np.asarray(data.x_test[rows]), data.y_test[rows]
            calibration = None
            if cfg.export_calibration_samples > 0:
                n_train = len(data.y_train)
                take = min(cfg.export_calibration_samples, n_train)
                calib_rows = np.sort(
                    stream_rng(cfg.seed, Stream.CALIBRATION).choice(n_train, take, replace=False)
                )
                calibration = np.asarray(data.x_train[calib_rows])
            self._data = (x_eval, y_eval, calibration)
        return self._data

    @staticmethod
    def skipped_entry(server_round: int, reason: str | None) -> dict[str, Any]:
        """An ``artifacts`` entry of an attempt that published nothing, with every documented key.

        None where the attempt has no value.
        """
        return {
            "round": server_round,
            "path": None,
            "int8_bytes": None,
            "fp32_bytes": None,
            "accuracy_fp32": None,
            "accuracy_int8": None,
            "latency_ms_p50_fp32": None,
            "latency_ms_p50_int8": None,
            "published": False,
            "reason": reason,
        }

    def export(self, event: RoundEvent) -> dict[str, Any]:
        """Run the pipeline for one round; return its ``artifacts`` entry."""
        cfg = self.cfg
        start = time.perf_counter()
        entry = self.skipped_entry(event.server_round, None)
        del entry["reason"]
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
                check: FederatedCheck | None = None
                if cfg.export_federated_eval:
                    candidate = self.sign_candidate(
                        event.server_round, fp32.read_bytes(), int8.read_bytes(), metrics, asdict(quant)
                    )
                    check = federated_check(
                        cfg, event.federation or event.grid, event.server_round, candidate
                    )
                    metrics.update(
                        federated_accuracy_fp32=check.accuracy_fp32,
                        federated_accuracy_int8=check.accuracy_int8,
                        federated_drop=check.drop,
                        federated_examples=check.examples,
                        federated_clients=check.clients,
                    )
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
            # The server's own split always judges; with the federated check the clients'
            # data (robust to a lying client) must agree too, so liars can refuse a model
            # but never pass one the server measured as failing.
            reasons = gate_reasons(
                cfg, metrics["accuracy_fp32"], metrics["accuracy_int8"], metrics["latency_ms_p50_int8"]
            )
            if check is not None:
                federated = federated_gate_reasons(cfg, check, metrics["latency_ms_p50_int8"])
                reasons += [r for r in federated if r not in reasons]
            if reasons:
                entry.update(reason="; ".join(reasons), export_s=time.perf_counter() - start)
                return entry
            try:
                release = self.releases.take(self.registry.next_release() - 1)
            except ArtifactError as err:
                entry.update(reason=str(err), export_s=time.perf_counter() - start)
                return entry
            manifest = build_manifest(
                server_round=event.server_round,
                files={"model.onnx": int8},
                metrics={**metrics, "fp32_bytes": entry["fp32_bytes"], "fp32_sha256": file_sha256(fp32)},
                quantization=asdict(quant),
                parent=self.registry.current(),
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                run_id=self.run_id,
                model=self._model_name(),
                release=release,
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
