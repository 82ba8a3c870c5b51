"""fedge's one configuration schema.

Every mode reads the same kebab-case keys: ``[tool.flwr.app.config]`` in
``pyproject.toml`` (the defaults Flower's ``flwr run`` uses), ``--run-config``
under Flower, and flags or ``--config FILE.toml`` under ``fedge simulate``.
They are parsed once, at the app boundary, into a frozen :class:`RunConfig`
that validates itself; nothing below that boundary reads raw run-config
dictionaries.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

if TYPE_CHECKING:
    import torch

    from fedge.compression import CodecSpec
    from fedge.data import DatasetSpec, FederatedData, LocalTraining

Auto: TypeAlias = Literal["auto"]
AUTO: Auto = "auto"
"""The value of a setting left to the dataset (``model``, ``lr``, ``batch-size``, ...)."""

ENGINES: tuple[str, ...] = ("inprocess", "ray")
DOWNLINKS: tuple[str, ...] = ("fp32", "fp16")
# The schema's allowed strategy names; `fedge.strategies.STRATEGIES` maps each to a
# class (a test keeps the two equal).
STRATEGY_NAMES: tuple[str, ...] = (
    "fedavg",
    "fedavgm",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
)


DP_MODES: tuple[str, ...] = ("none", "central")
CLIENT_SAMPLINGS: tuple[str, ...] = ("fixed", "poisson")
ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")
# Strategies that need every client's update (no secure aggregation, no DP).
PER_CLIENT_STRATEGIES: tuple[str, ...] = ("fedmedian", "fedtrimmedavg", "krum")
SECAGG_DROP_STAGES: tuple[str, ...] = ("advertise-keys", "share-keys", "masked-input")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line that says how to fix it."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class RunConfig:
    """The resolved configuration of one federated run.

    Field names are the snake_case form of the kebab-case config keys
    (``num-rounds`` is ``num_rounds``). Defaults equal ``[tool.flwr.app.config]``.

    Parameters
    ----------
    dataset : str
        One of :data:`fedge.data.DATASETS` (default ``digits``, bundled with scikit-learn),
        or ``hf:<hub id>`` for a Hugging Face dataset through flwr-datasets (online only).
    data_dir : str
        Folder holding the dataset folders (as ``../shared/datasets``); empty means
        ``$FEDGE_DATA_DIR``. Not needed for ``digits``.
    partition : str
        ``iid``, ``dirichlet:ALPHA``, ``pathological:K`` or ``natural``.
    model : str
        A name in :data:`fedge.models.MODELS`, or ``auto`` for the dataset's default.
    strategy : str
        A name in :data:`STRATEGY_NAMES`.
    num_clients : int
        Number of simulated clients (partitions), or of SuperNodes to expect.
    clients_per_round : int
        Clients sampled for training each round (``<= num_clients``).
    num_rounds : int
        Federated rounds to run.
    local_epochs, local_steps, batch_size, lr : int, int, int, float, or "auto"
        Client-side SGD: epochs over the local data per round, the most optimizer steps
        per round (0: no cap; training stops at whichever of the two comes first),
        mini-batch size, learning rate. ``auto`` takes the dataset's measured value
        (``DatasetSpec.training``; README, "Datasets"); each key resolves on its own,
        so ``local-epochs = 3`` with ``local-steps = "auto"`` keeps the dataset's cap.
    momentum : float
        SGD momentum (momentum buffers are reset every round).
    grad_clip_norm : float or "auto"
        Clip each mini-batch gradient's global L2 norm to this before the SGD step
        (0: off); ``auto`` takes the dataset's value. It keeps a high ``lr`` from
        exploding the 1-D and recurrent models; it is not a privacy mechanism.
    seed : int
        Seeds partitioning, model initialisation, client sampling and local shuffling.
    engine : str
        ``inprocess`` (fedge's worker-pool Grid) or ``ray`` (Flower's ``run_simulation``).
    workers : int
        Worker processes of the in-process engine; 0 means one per CPU core.
    min_reply_fraction : float
        A round aggregates only if at least ``ceil(min_reply_fraction * sampled)``
        clients replied with a valid update; otherwise the global model is kept.
    round_timeout_s : float
        Longest wait for the replies of one round, in seconds.
    max_examples_per_client : int
        The largest ``num-examples`` (aggregation weight) a client may report; a reply
        claiming more is dropped, so a liar cannot outweigh everyone else or overflow the
        weight sum. 0 (the default) means the largest training partition of the run's
        data as the server partitions it: a liar weighs at most as much as the largest
        honest client. Set it explicitly when devices hold data of their own.
    local_test_fraction : float
        Share of each client's partition held out for federated evaluation
        (natural splits use the client's own test data instead).
    fraction_evaluate : float
        Share of clients asked to evaluate the global model each round (0 disables
        federated evaluation; central evaluation always runs).
    proximal_mu : float
        FedProx proximal term (used by ``strategy = "fedprox"``).
    server_lr, server_momentum : float
        Server-side learning rate and momentum (FedAvgM, FedAdam/Yogi/Adagrad).
    trim_beta : float
        Fraction trimmed at each end by FedTrimmedAvg, in [0, 0.5).
    compression : str
        Codec of the clients' updates (``local - global``, per tensor): ``none`` (plain
        float32 weights, as Flower sends them), ``qsgd:BITS`` (stochastic uniform
        quantization, 1..8 bits), ``ternary`` (stochastic -m/0/+m, 1.6 bits),
        ``rotate+qsgd:BITS`` and ``rotate+ternary`` (randomized Hadamard rotation first),
        ``topk:FRACTION`` (the largest entries, in (0, 1]) or ``stc:FRACTION`` (the largest
        entries as sign times mean magnitude); see :mod:`fedge.compression`.
    error_feedback : bool
        Clients keep what the codec dropped and add it to their next update; needs a lossy,
        contractive ``compression`` (``stc``, ``topk``, ``qsgd`` from 2 bits; see
        :func:`fedge.compression.error_feedback_compatible`).
    downlink : str
        How the server sends the global model: ``fp32`` or ``fp16`` (half the bytes; the
        server keeps its model in fp32 and clients send updates against what they got,
        as uncompressed float32 updates when ``compression`` is ``none``).
    secagg : bool
        Secure aggregation (SecAgg+, :mod:`fedge.secagg`): the server learns only the sum of
        the sampled clients' updates. Needs a linear strategy (not fedmedian, fedtrimmedavg or
        krum) and a dense codec (``none``, ``qsgd``, ``ternary`` and their rotated forms).
    secagg_bits : int or "auto"
        Bits per quantized element under secure aggregation when ``compression = "none"``
        (1..8); ``auto`` is 8. ``qsgd:B`` and ``ternary`` bring their own bits.
    secagg_clip : float
        The shared quantization scale ``c``: each element of a client's (weight-scaled,
        rotated) update is clipped to ``[-c, c]`` before quantization.
    secagg_neighbors : int or "auto"
        ``k``, neighbours per client in the Harary graph; ``auto`` is the smallest ``k`` whose
        failure bounds meet 2**-40 security and 2**-20 correctness for the cohort and
        ``secagg-max-dropout`` (:func:`fedge.secagg.find_graph_parameters`).
    secagg_threshold : int or "auto"
        ``t``, Shamir threshold among a client's neighbours (more than ``k / 2``); ``auto``
        comes with ``k``.
    secagg_max_dropout : float
        Declared fraction of a cohort that may drop, in [0, 1); sizes ``k`` and ``t``.
    secagg_drop_fraction : float
        Simulation only (tests, benchmarks): this share of each cohort drops after
        ``secagg-drop-stage``; in [0, 1).
    secagg_drop_stage : str
        After which stage those clients drop: ``advertise-keys``, ``share-keys`` or
        ``masked-input``.
    dp : str
        Differential privacy: ``none``, or ``central`` (user-level DP with a trusted server:
        clients clip their update to ``clip-norm``, the server re-clips what it decoded, adds
        Gaussian noise of std ``noise-multiplier * clip-norm`` to the sum and divides by the
        expected cohort, before the strategy's server optimizer; :mod:`fedge.server.privacy`).
    clip_norm : float
        ``C``, the L2 bound of each client's update (all its tensors together), > 0.
    noise_multiplier : float
        ``z``: the noise on the sum has std ``z * C``; > 0.
    target_delta : float
        The ``delta`` at which every round reports epsilon, in (0, 1).
    target_epsilon : float
        A privacy budget: the round that would push epsilon past it is not run (the run ends
        with status 0 and says so); 0 means no budget.
    accountant : str
        ``rdp`` or ``pld`` (both from ``dp_accounting``; PLD only with Poisson sampling).
    client_sampling : str
        ``fixed`` (``clients-per-round`` drawn without replacement) or ``poisson`` (each client
        independently with probability ``clients-per-round / num-clients``).
    clip_quantile : float
        0: fixed clipping at ``clip-norm``. In (0, 1): adaptive clipping (Andrew et al. 2021):
        ``clip-norm`` is the first round's clip, which then follows this quantile of the
        clients' update norms through a noised count of who was under it.
    clip_count_stddev : float
        ``sigma_b``, the noise on that count; 0 means ``clients-per-round / 20`` (the paper's).
    dp_sgd : bool
        On-device DP-SGD with Opacus (sample-level privacy of each device's own data),
        independent of ``dp``.
    dp_sgd_noise_multiplier, dp_sgd_max_grad_norm : float
        Opacus's noise multiplier and per-sample gradient clip (both > 0).
    dp_sgd_target_epsilon : float
        A device's own budget (its privacy ledger on disk): a device that spent it refuses
        to train; 0 means no budget.
    out_dir : str
        Parent folder of run folders; a run writes ``out_dir/run_name/``.
    run_name : str
        Name of the run folder; empty means ``<dataset>-<strategy>-<timestamp>``.
    export_every : str
        When the server exports the global model to int8 ONNX: ``off``, ``final`` (the
        last round only) or a whole number N (every N rounds, and the last round).
    export_max_accuracy_drop : float
        Gate: the int8 model may lose at most this much top-1 accuracy against fp32
        (a fraction: 0.01 is one point).
    export_max_latency_ms : float
        Gate: the int8 model's p50 latency (1 thread, batch 1) may be at most this, in
        ms; 0 means no latency gate.
    export_calibration_samples : int
        Server-side training samples that calibrate static int8 quantization; 0 uses
        dynamic quantization (no calibration), recorded as such in the manifest.
    export_federated_eval : bool
        Also send the int8 candidate to clients, which evaluate it on their local data;
        the gate then uses the example-weighted federated accuracy.
    signing_key : str
        Ed25519 private key that signs published models (``fedge keys new``); empty
        makes a key pair in the run folder's ``keys/``.
    registry_dir : str
        Where published versions go; empty means the run folder's ``artifacts/``.
    """

    dataset: str = "digits"
    data_dir: str = ""
    partition: str = "dirichlet:0.5"
    model: str = "auto"
    strategy: str = "fedavg"
    num_clients: int = 50
    clients_per_round: int = 10
    num_rounds: int = 20
    local_epochs: int | Auto = AUTO
    local_steps: int | Auto = AUTO
    batch_size: int | Auto = AUTO
    lr: float | Auto = AUTO
    momentum: float = 0.9
    grad_clip_norm: float | Auto = AUTO
    seed: int = 42
    engine: str = "inprocess"
    workers: int = 0
    min_reply_fraction: float = 0.5
    round_timeout_s: float = 600.0
    max_examples_per_client: int = 0
    local_test_fraction: float = 0.0
    fraction_evaluate: float = 0.0
    proximal_mu: float = 0.0
    server_lr: float = 1.0
    server_momentum: float = 0.0
    trim_beta: float = 0.2
    compression: str = "none"
    error_feedback: bool = False
    downlink: str = "fp32"
    secagg: bool = False
    secagg_bits: int | Auto = AUTO
    secagg_clip: float = 0.2
    secagg_neighbors: int | Auto = AUTO
    secagg_threshold: int | Auto = AUTO
    secagg_max_dropout: float = 0.1
    secagg_drop_fraction: float = 0.0
    secagg_drop_stage: str = "share-keys"
    dp: str = "none"
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    target_delta: float = 1e-5
    target_epsilon: float = 0.0
    accountant: str = "rdp"
    client_sampling: str = "fixed"
    clip_quantile: float = 0.0
    clip_count_stddev: float = 0.0
    dp_sgd: bool = False
    dp_sgd_noise_multiplier: float = 1.0
    dp_sgd_max_grad_norm: float = 1.0
    dp_sgd_target_epsilon: float = 0.0
    out_dir: str = "runs"
    run_name: str = field(default="")
    export_every: str = "final"
    export_max_accuracy_drop: float = 0.01
    export_max_latency_ms: float = 0.0
    export_calibration_samples: int = 256
    export_federated_eval: bool = False
    signing_key: str = ""
    registry_dir: str = ""

    def __post_init__(self) -> None:
        # Imported here: the kernel's data and model modules pull in numpy/torch, and
        # keeping them out of module import keeps `fedge --help` fast.
        from fedge.compression import CodecError, error_feedback_compatible
        from fedge.data import DataError, check_dataset_name, parse_partition
        from fedge.models import MODELS

        try:
            check_dataset_name(self.dataset)  # built-in names, or hf:<hub id> (not fetched here)
            parse_partition(self.partition)
        except DataError as err:
            raise ConfigError(str(err)) from None
        _check(
            self.model == "auto" or self.model in MODELS,
            f"unknown model {self.model!r}; choose auto or one of: {', '.join(MODELS)}",
        )
        _check(
            self.strategy in STRATEGY_NAMES,
            f"unknown strategy {self.strategy!r}; choose one of: {', '.join(STRATEGY_NAMES)}",
        )
        _check(
            self.engine in ENGINES,
            f"unknown engine {self.engine!r}; choose one of: {', '.join(ENGINES)}",
        )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float):
                _check(math.isfinite(value), f"{_key(f.name)} must be a finite number, got {value}")
        # numpy's and scikit-learn's seeds are 32-bit.
        _check(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")
        for name in ("num_clients", "clients_per_round", "num_rounds"):
            value = getattr(self, name)
            _check(value > 0, f"{_key(name)} must be a positive whole number, got {value}")
        for name in ("local_epochs", "batch_size"):
            value = getattr(self, name)
            _check(
                value == AUTO or value > 0,
                f"{_key(name)} must be auto or a positive whole number, got {value}",
            )
        _check(
            self.local_steps == AUTO or self.local_steps >= 0,
            f"local-steps must be auto, 0 (no cap) or a positive whole number, got {self.local_steps}",
        )
        _check(self.workers >= 0, f"workers must be 0 (one per core) or more, got {self.workers}")
        _check(
            self.clients_per_round <= self.num_clients,
            f"clients-per-round ({self.clients_per_round}) exceeds num-clients "
            f"({self.num_clients}); lower clients-per-round or raise num-clients",
        )
        _check(self.lr == AUTO or self.lr > 0, f"lr must be auto or a number > 0, got {self.lr}")
        _check(
            self.grad_clip_norm == AUTO or self.grad_clip_norm >= 0,
            f"grad-clip-norm must be auto, 0 (off) or a number > 0, got {self.grad_clip_norm}",
        )
        _check(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        _check(
            0 < self.min_reply_fraction <= 1,
            f"min-reply-fraction must be in (0, 1], got {self.min_reply_fraction}",
        )
        _check(self.round_timeout_s > 0, f"round-timeout-s must be > 0, got {self.round_timeout_s}")
        _check(
            0 <= self.max_examples_per_client < 2**53,
            "max-examples-per-client must be 0 (the largest partition) or a whole number below 2**53, "
            f"got {self.max_examples_per_client}",
        )
        _check(
            0 <= self.local_test_fraction < 1,
            f"local-test-fraction must be in [0, 1), got {self.local_test_fraction}",
        )
        _check(
            0 <= self.fraction_evaluate <= 1,
            f"fraction-evaluate must be in [0, 1], got {self.fraction_evaluate}",
        )
        _check(self.proximal_mu >= 0, f"proximal-mu must be >= 0, got {self.proximal_mu}")
        _check(self.server_lr > 0, f"server-lr must be > 0, got {self.server_lr}")
        _check(
            0 <= self.server_momentum < 1,
            f"server-momentum must be in [0, 1), got {self.server_momentum}",
        )
        _check(0 <= self.trim_beta < 0.5, f"trim-beta must be in [0, 0.5), got {self.trim_beta}")
        try:
            codec = self.codec()
        except CodecError as err:
            raise ConfigError(f"compression: {err}") from None
        _check(
            not self.error_feedback or error_feedback_compatible(codec),
            f"error-feedback needs a lossy, contractive compression, not {self.compression!r} "
            "(none loses nothing; 1-bit qsgd and ternary are unbiased but their error can exceed "
            "the update, so the residual grows); use stc:FRACTION, topk:FRACTION or qsgd:BITS "
            "with BITS >= 2, or set error-feedback = false",
        )
        self._check_secagg(codec)
        self._check_privacy()
        _check(
            self.downlink in DOWNLINKS,
            f"unknown downlink {self.downlink!r}; choose one of: {', '.join(DOWNLINKS)}",
        )
        _check(
            self.export_every in ("off", "final")
            or (self.export_every.isdigit() and int(self.export_every) > 0),
            "export-every must be off, final or a positive whole number of rounds, "
            f"got {self.export_every!r}",
        )
        _check(
            0 <= self.export_max_accuracy_drop <= 1,
            "export-max-accuracy-drop must be in [0, 1] (0.01 is one point), "
            f"got {self.export_max_accuracy_drop}",
        )
        _check(
            self.export_max_latency_ms >= 0,
            f"export-max-latency-ms must be >= 0 (0: no latency gate), got {self.export_max_latency_ms}",
        )
        _check(
            self.export_calibration_samples >= 0,
            f"export-calibration-samples must be >= 0 (0: dynamic quantization), "
            f"got {self.export_calibration_samples}",
        )

    def _check_secagg(self, codec: CodecSpec) -> None:
        from fedge.compression import CodecError, require_secagg_compatible

        _check(
            self.secagg_bits == AUTO or 1 <= self.secagg_bits <= 8,
            f"secagg-bits must be auto or a whole number in 1..8, got {self.secagg_bits}",
        )
        _check(
            self.secagg_clip > 0,
            f"secagg-clip must be a number > 0 (the shared scale), got {self.secagg_clip}",
        )
        _check(
            0 <= self.secagg_max_dropout < 1,
            f"secagg-max-dropout must be in [0, 1), got {self.secagg_max_dropout}",
        )
        _check(
            0 <= self.secagg_drop_fraction < 1,
            f"secagg-drop-fraction must be in [0, 1), got {self.secagg_drop_fraction}",
        )
        _check(
            self.secagg_drop_stage in SECAGG_DROP_STAGES,
            f"unknown secagg-drop-stage {self.secagg_drop_stage!r}; "
            f"choose one of: {', '.join(SECAGG_DROP_STAGES)}",
        )
        for name in ("secagg_neighbors", "secagg_threshold"):
            value = getattr(self, name)
            _check(
                value == AUTO or value >= 1, f"{_key(name)} must be auto or a whole number >= 1, got {value}"
            )
        if not self.secagg:
            return
        _check(
            self.strategy not in PER_CLIENT_STRATEGIES,
            f"strategy {self.strategy!r} cannot run under secure aggregation: it needs every client's update "
            "(a median, a trimmed mean or Krum's distances), and the server sees only their sum; use fedavg, "
            "fedavgm, fedprox, fedadam, fedyogi or fedadagrad, or set secagg = false",
        )
        try:
            require_secagg_compatible(codec)
        except CodecError as err:
            raise ConfigError(str(err)) from None
        _check(
            self.secagg_bits == AUTO or codec.kind == "none",
            f"secagg-bits applies to compression = 'none'; {self.compression!r} quantizes at its own bits "
            "(set secagg-bits = auto)",
        )
        _check(
            self.clients_per_round >= 2,
            "secure aggregation needs at least 2 clients a round, "
            f"got clients-per-round = {self.clients_per_round}",
        )
        self.secagg_graph()

    def _check_privacy(self) -> None:
        _check(self.dp in DP_MODES, f"unknown dp {self.dp!r}; choose one of: {', '.join(DP_MODES)}")
        _check(
            self.client_sampling in CLIENT_SAMPLINGS,
            f"unknown client-sampling {self.client_sampling!r}; choose one of: {', '.join(CLIENT_SAMPLINGS)}",
        )
        _check(
            self.accountant in ACCOUNTANTS,
            f"unknown accountant {self.accountant!r}; choose one of: {', '.join(ACCOUNTANTS)}",
        )
        _check(self.clip_norm > 0, f"clip-norm must be a number > 0, got {self.clip_norm}")
        _check(
            self.noise_multiplier > 0,
            f"noise-multiplier must be a number > 0, got {self.noise_multiplier} "
            "(fedge privacy calibrate prints the one that meets a budget)",
        )
        _check(0 < self.target_delta < 1, f"target-delta must be in (0, 1), got {self.target_delta}")
        _check(
            self.target_epsilon >= 0,
            f"target-epsilon must be >= 0 (0: no budget), got {self.target_epsilon}",
        )
        _check(
            self.dp_sgd_noise_multiplier > 0,
            f"dp-sgd-noise-multiplier must be a number > 0, got {self.dp_sgd_noise_multiplier}",
        )
        _check(
            self.dp_sgd_max_grad_norm > 0,
            f"dp-sgd-max-grad-norm must be a number > 0, got {self.dp_sgd_max_grad_norm}",
        )
        _check(
            self.dp_sgd_target_epsilon >= 0,
            f"dp-sgd-target-epsilon must be >= 0 (0: no budget), got {self.dp_sgd_target_epsilon}",
        )
        _check(
            not (self.dp_sgd and (self.strategy == "fedprox" or self.proximal_mu > 0)),
            "dp-sgd cannot train FedProx's proximal term (Opacus's per-sample gradients leave it out); "
            "use another strategy with proximal-mu = 0, or set dp-sgd = false",
        )
        _check(
            0 <= self.clip_quantile < 1,
            f"clip-quantile must be 0 (fixed clipping) or in (0, 1), got {self.clip_quantile}",
        )
        _check(
            self.clip_count_stddev >= 0,
            f"clip-count-stddev must be >= 0 (0: clients-per-round / 20), got {self.clip_count_stddev}",
        )
        if self.dp == "none":
            return
        _check(
            self.strategy not in PER_CLIENT_STRATEGIES,
            f"strategy {self.strategy!r} cannot run with differential privacy: its aggregation (a median, a "
            "trimmed mean or Krum's choice) is not the noised sum the accountant covers; use fedavg, "
            "fedavgm, fedprox, fedadam, fedyogi or fedadagrad, or set dp = none",
        )
        _check(
            not self.secagg,
            "dp = central adds the noise on the server, which must then see the clipped updates; "
            "with secagg = true use distributed DP (not available yet) or set secagg = false",
        )
        if self.clip_quantile > 0:
            from fedge.privacy import sum_noise_multiplier

            try:
                sum_noise_multiplier(self.noise_multiplier, self.count_noise_std())
            except ValueError:
                raise ConfigError(
                    f"adaptive clipping's noised count (std {self.count_noise_std():g}) would spend all of "
                    f"noise-multiplier {self.noise_multiplier}; set clip-count-stddev above "
                    f"{self.noise_multiplier / 2:g}, sample more clients a round, or lower noise-multiplier"
                ) from None
        _check(
            not (self.accountant == "pld" and self.client_sampling == "fixed"),
            "the PLD accountant covers Poisson sampling only; "
            "set client-sampling = poisson or accountant = rdp",
        )

    def count_noise_std(self) -> float:
        """``sigma_b`` of adaptive clipping's noised count."""
        return self.clip_count_stddev or self.clients_per_round / 20

    def sample_rate(self) -> float:
        """``q = clients-per-round / num-clients``: Poisson sampling's rate, fixed sampling's fraction."""
        return self.clients_per_round / self.num_clients

    def secagg_graph(self) -> tuple[int, int]:
        """``(k, t)``: neighbours and Shamir threshold of a cohort of ``clients-per-round``.

        Raises
        ------
        ConfigError
            If the given values do not fit the cohort, or no degree meets the failure targets.
        """
        from fedge.secagg import SecAggError, find_graph_parameters

        n = self.clients_per_round
        try:
            auto = find_graph_parameters(n, self.secagg_max_dropout)
        except SecAggError as err:
            if self.secagg_neighbors == AUTO or self.secagg_threshold == AUTO:
                raise ConfigError(f"secagg: {err}") from None
            auto = None
        if self.secagg_neighbors == AUTO:
            assert auto is not None
            k = auto.degree
        else:
            k = int(self.secagg_neighbors)
        _check(
            k == n - 1 or (2 <= k < n - 1 and k % 2 == 0),
            f"secagg-neighbors must be even in 2..{n - 2} or {n - 1} (everyone) for {n} clients a round, "
            f"got {k}",
        )
        if self.secagg_threshold != AUTO:
            t = int(self.secagg_threshold)
        elif auto is not None and auto.degree == k:
            t = auto.threshold
        else:
            t = k // 2 + 1
        _check(
            k // 2 + 1 <= t <= k,
            f"secagg-threshold must be in {k // 2 + 1}..{k} (more than half of {k} neighbours), got {t}",
        )
        return k, t

    def secagg_level_bits(self) -> int:
        """Bits per level of ``compression = none`` under secure aggregation."""
        return 8 if self.secagg_bits == AUTO else int(self.secagg_bits)

    # --- construction -------------------------------------------------------------

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
        """Build a config from kebab-case keys, on top of ``base`` (default: the defaults).

        Parameters
        ----------
        values : Mapping[str, Any]
            Kebab-case keys with TOML-typed or string values (strings are converted
            to the field's type, as on a command line).
        base : RunConfig, optional
            Values not given keep ``base``'s value.

        Raises
        ------
        ConfigError
            On an unknown key, a value of the wrong type, or a value out of range.
        """
        known = {f.name: f for f in dataclasses.fields(cls)}
        changes: dict[str, Any] = {}
        for key, raw in values.items():
            name = key.replace("-", "_")
            if name not in known or "_" in key:
                raise ConfigError(_unknown_key_message(key))
            changes[name] = _coerce(key, raw, known[name].type)
        return dataclasses.replace(base or cls(), **changes)

    @classmethod
    def from_toml(cls, path: str | Path, base: RunConfig | None = None) -> RunConfig:
        """Read keys from a TOML file: top level, or ``[tool.flwr.app.config]`` of a pyproject."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found; check the --config path") from None
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"config file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                f"{err.start}); TOML files are UTF-8: re-save it as UTF-8"
            ) from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
        table = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", data)
        return cls.from_mapping(table, base)

    def to_mapping(self) -> dict[str, Any]:
        """The config as kebab-case keys (what ``summary.json`` records as ``config``)."""
        return {_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    # --- derived values -----------------------------------------------------------

    def resolved_model(self, default_model: str) -> str:
        """The model name, with ``auto`` replaced by the dataset's default model."""
        return default_model if self.model == AUTO else self.model

    def training(self, spec: DatasetSpec) -> LocalTraining:
        """This run's local-training settings, each ``auto`` replaced by ``spec.training``'s value.

        What the server sends clients in every training round's config (with ``momentum``);
        digits resolves to lr 0.05, batch size 8, 5 epochs, no step cap, no clipping.
        """
        base = spec.training
        return dataclasses.replace(
            base,
            lr=base.lr if self.lr == AUTO else self.lr,
            batch_size=base.batch_size if self.batch_size == AUTO else self.batch_size,
            local_epochs=base.local_epochs if self.local_epochs == AUTO else self.local_epochs,
            local_steps=base.local_steps if self.local_steps == AUTO else self.local_steps,
            grad_clip_norm=base.grad_clip_norm if self.grad_clip_norm == AUTO else self.grad_clip_norm,
        )

    def train_settings(self, spec: DatasetSpec) -> dict[str, int | float]:
        """The resolved training settings as round-ConfigRecord values (keys of :mod:`fedge.records`).

        The server puts these in every training message, so a client never resolves
        ``auto`` itself and a device without the dataset spec trains as the server says.
        """
        from fedge import records

        t = self.training(spec)
        return {
            records.LR: t.lr,
            records.MOMENTUM: self.momentum,
            records.LOCAL_EPOCHS: t.local_epochs,
            records.LOCAL_STEPS: t.local_steps,
            records.BATCH_SIZE: t.batch_size,
            records.GRAD_CLIP_NORM: t.grad_clip_norm,
        }

    def federated_data(self) -> FederatedData:
        """This run's dataset and partition (loaded lazily, cached per process)."""
        from fedge.data import federated_data

        return federated_data(
            self.dataset,
            self.partition,
            self.num_clients,
            self.seed,
            data_dir=self.data_dir or None,
            local_test_fraction=self.local_test_fraction,
        )

    def build_model(self, spec: DatasetSpec) -> torch.nn.Module:
        """This run's initial global model for a dataset described by ``spec`` (seeded by ``seed``)."""
        from fedge.models import build_model

        return build_model(
            self.resolved_model(spec.default_model),
            input_shape=spec.input_shape,
            num_classes=spec.num_classes,
            seed=self.seed,
            vocab_size=spec.vocab_size,
        )

    def client_settings(self) -> dict[str, str | int | float]:
        """What a client needs to load its data and build the model, as ConfigRecord values.

        The server sends these with every message (keys of :mod:`fedge.records`), so a
        client reads nothing of the server's run config: server-only settings (the
        signing key's path) never matter to a device, and a newer server's keys never
        break an older client.
        """
        from fedge import records

        return {
            records.DATASET: self.dataset,
            records.PARTITION: self.partition,
            records.NUM_PARTITIONS: self.num_clients,
            records.DATA_SEED: self.seed,
            records.MODEL: self.model,
            records.LOCAL_TEST_FRACTION: self.local_test_fraction,
        }

    def codec(self) -> CodecSpec:
        """The parsed ``compression`` codec."""
        from fedge.compression import parse_codec

        return parse_codec(self.compression)

    def exports_after(self, server_round: int) -> bool:
        """Whether the server exports the global model after ``server_round``."""
        if self.export_every == "off":
            return False
        if server_round == self.num_rounds:
            return True
        return self.export_every != "final" and server_round % int(self.export_every) == 0

    def min_replies(self, num_sampled: int) -> int:
        """Fewest valid replies that let a round of ``num_sampled`` clients aggregate."""
        # The epsilon keeps 0.5 * 10 from rounding up to 6 through float error.
        return max(1, math.ceil(self.min_reply_fraction * num_sampled - 1e-9))


def _key(name: str) -> str:
    return name.replace("_", "-")


def config_keys() -> list[str]:
    """All kebab-case keys of the schema, in declaration order."""
    return [_key(f.name) for f in dataclasses.fields(RunConfig)]


def _unknown_key_message(key: str) -> str:
    keys = config_keys()
    close = difflib.get_close_matches(key.replace("_", "-"), keys, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown config key {key!r}; {hint}valid keys: {', '.join(keys)}"


# String keys that also take a whole number (`export-every = 5` in TOML).
_INT_AS_STR = {"export-every"}
# Keys that take `auto` or a number of this kind.
_AUTO_OR = {
    "local-epochs": "int",
    "local-steps": "int",
    "batch-size": "int",
    "lr": "float",
    "grad-clip-norm": "float",
    "secagg-bits": "int",
    "secagg-neighbors": "int",
    "secagg-threshold": "int",
}


def _coerce(key: str, raw: Any, type_name: Any) -> Any:
    """Convert ``raw`` to the field type named by ``type_name`` ("int", "float", "str", "bool")."""
    if key in _AUTO_OR:
        if isinstance(raw, str) and raw.strip() == AUTO:
            return AUTO
        try:
            return _coerce_kind(key, raw, _AUTO_OR[key])
        except ConfigError:
            number = "a whole number" if _AUTO_OR[key] == "int" else "a number"
            raise ConfigError(f"{key} must be auto or {number}, got {raw!r}") from None
    return _coerce_kind(key, raw, type_name if isinstance(type_name, str) else type_name.__name__)


def _coerce_kind(key: str, raw: Any, kind: str) -> Any:
    """Convert ``raw`` to ``kind`` ("int", "float", "str", "bool")."""
    if kind == "str":
        if key in _INT_AS_STR and isinstance(raw, int) and not isinstance(raw, bool):
            return str(raw)
        if not isinstance(raw, str):
            raise ConfigError(f"{key} must be a string, got {raw!r}")
        return raw
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
            return raw.strip().lower() == "true"
        raise ConfigError(f"{key} must be true or false, got {raw!r}")
    if isinstance(raw, bool):
        raise ConfigError(f"{key} must be a number, got {raw!r}")
    if kind == "int":
        if isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                raise ConfigError(f"{key} must be a whole number, got {raw!r}") from None
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if not isinstance(raw, int):
            raise ConfigError(f"{key} must be a whole number, got {raw!r}")
        return raw
    if kind == "float":
        if isinstance(raw, str):
            try:
                return float(raw.strip())
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {raw!r}") from None
        if not isinstance(raw, int | float):
            raise ConfigError(f"{key} must be a number, got {raw!r}")
        return float(raw)
    raise AssertionError(f"unsupported field type {kind} for {key}")  # pragma: no cover
