"""The one config schema: defaults equal pyproject's, keys validate with one-line errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedge.config import STRATEGY_NAMES, ConfigError, RunConfig, config_keys
from fedge.strategies import STRATEGIES

REPO = Path(__file__).resolve().parents[2]


def test_defaults_equal_the_flower_app_config() -> None:
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table == RunConfig().to_mapping()


def test_issue_keys_exist_with_their_names() -> None:
    required = [
        "dataset",
        "data-dir",
        "partition",
        "model",
        "strategy",
        "num-clients",
        "clients-per-round",
        "num-rounds",
        "local-epochs",
        "batch-size",
        "lr",
        "seed",
        "engine",
        "workers",
    ]
    assert set(required) <= set(config_keys())


def test_embedded_default_run() -> None:
    cfg = RunConfig()
    assert (cfg.dataset, cfg.partition, cfg.strategy) == ("digits", "dirichlet:0.5", "fedavg")
    assert (cfg.num_clients, cfg.clients_per_round, cfg.num_rounds) == (50, 10, 20)


def test_strategy_registry_matches_the_schema() -> None:
    assert tuple(STRATEGIES) == STRATEGY_NAMES


def test_strings_are_converted_like_command_line_values() -> None:
    cfg = RunConfig.from_mapping({"num-rounds": "5", "lr": "0.1", "dataset": "mnist"})
    assert (cfg.num_rounds, cfg.lr, cfg.dataset) == (5, 0.1, "mnist")
    assert RunConfig.from_mapping({"lr": 1}).lr == 1.0 and isinstance(
        RunConfig.from_mapping({"lr": 1}).lr, float
    )


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        RunConfig().num_rounds = 3  # type: ignore[misc]


def test_toml_file_and_pyproject_table(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('num-rounds = 3\nstrategy = "fedprox"\nproximal-mu = 0.1\n')
    cfg = RunConfig.from_toml(tmp_path / "a.toml")
    assert (cfg.num_rounds, cfg.strategy, cfg.proximal_mu) == (3, "fedprox", 0.1)
    assert RunConfig.from_toml(REPO / "pyproject.toml") == RunConfig()


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"dataset": "imagenet"}, "unknown dataset 'imagenet'; choose one of: digits, mnist"),
        ({"model": "resnet"}, "unknown model 'resnet'; choose auto or one of: cnn8"),
        ({"strategy": "fedfoo"}, "unknown strategy 'fedfoo'; choose one of: fedavg"),
        ({"engine": "spark"}, "unknown engine 'spark'; choose one of: inprocess, ray"),
        ({"partition": "zipf"}, "partition"),
        ({"num-rounds": 0}, "num-rounds must be a positive whole number, got 0"),
        ({"num-clients": -3}, "num-clients must be a positive whole number, got -3"),
        ({"batch-size": "abc"}, "batch-size must be auto or a whole number, got 'abc'"),
        ({"batch-size": 0}, "batch-size must be auto or a positive whole number, got 0"),
        ({"local-epochs": 1.5}, "local-epochs must be auto or a whole number, got 1.5"),
        ({"local-steps": -1}, "local-steps must be auto, 0 (no cap) or a positive whole number, got -1"),
        ({"lr": "fast"}, "lr must be auto or a number, got 'fast'"),
        ({"lr": True}, "lr must be auto or a number, got True"),
        ({"grad-clip-norm": -0.5}, "grad-clip-norm must be auto, 0 (off) or a number > 0, got -0.5"),
        ({"num-rounds": 2.5}, "num-rounds must be a whole number, got 2.5"),
        ({"clients-per-round": 60}, "clients-per-round (60) exceeds num-clients (50)"),
        ({"min-reply-fraction": 0.0}, "min-reply-fraction must be in (0, 1], got 0.0"),
        ({"min-reply-fraction": 1.5}, "min-reply-fraction must be in (0, 1], got 1.5"),
        ({"fraction-evaluate": -0.1}, "fraction-evaluate must be in [0, 1]"),
        ({"num-round": 3}, "unknown config key 'num-round'; did you mean 'num-rounds'?"),
        ({"num_rounds": 3}, "unknown config key 'num_rounds'; did you mean 'num-rounds'?"),
        ({"lr": -1}, "lr must be auto or a number > 0, got -1.0"),
        ({"export-every": "sometimes"}, "export-every must be off, final or a positive whole number"),
        ({"export-every": 0}, "export-every must be off, final or a positive whole number"),
        ({"export-federated-eval": "maybe"}, "export-federated-eval must be true or false, got 'maybe'"),
        ({"export-max-accuracy-drop": 2}, "export-max-accuracy-drop must be in [0, 1]"),
        ({"round-timeout-s": "inf"}, "round-timeout-s must be a finite number, got inf"),
        ({"lr": "nan"}, "lr must be a finite number, got nan"),
        ({"seed": -1}, "seed must be in [0, 2**32), got -1"),
        ({"seed": 2**32}, "seed must be in [0, 2**32)"),
    ],
)
def test_bad_values_are_one_line_errors(values: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(values)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message


def test_export_schedule() -> None:
    def rounds(every: object) -> list[int]:
        cfg = RunConfig.from_mapping({"num-rounds": 10, "export-every": every})
        return [r for r in range(1, 11) if cfg.exports_after(r)]

    assert rounds("off") == []
    assert rounds("final") == [10]
    assert rounds(3) == [3, 6, 9, 10]  # a TOML integer works as well as "3"
    assert rounds("5") == [5, 10]


def test_booleans_from_toml_and_command_line() -> None:
    assert RunConfig.from_mapping({"export-federated-eval": True}).export_federated_eval is True
    assert RunConfig.from_mapping({"export-federated-eval": "true"}).export_federated_eval is True
    assert RunConfig.from_mapping({"export-federated-eval": "False"}).export_federated_eval is False


def test_compression_keys_parse_and_validate() -> None:
    cfg = RunConfig.from_mapping({"compression": "stc:0.1", "error-feedback": "true", "downlink": "fp16"})
    assert (str(cfg.codec()), cfg.error_feedback, cfg.downlink) == ("stc:0.1", True, "fp16")
    assert RunConfig().codec().kind == "none" and RunConfig().downlink == "fp32"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"compression": "zip"}, "compression: unknown codec 'zip'; valid forms:"),
        ({"compression": "qsgd:9"}, "compression: qsgd needs num_bits in 1..8, got 9"),
        ({"downlink": "int8"}, "unknown downlink 'int8'; choose one of: fp32, fp16"),
        ({"error-feedback": True}, "error-feedback needs a lossy, contractive compression, not 'none'"),
        ({"compression": "ternary", "error-feedback": True}, "not 'ternary'"),
        ({"compression": "qsgd:1", "error-feedback": True}, "use stc:FRACTION, topk:FRACTION or qsgd:BITS"),
    ],
)
def test_bad_compression_settings_are_one_line_errors(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        RunConfig.from_mapping(values)
    text = str(excinfo.value)
    assert message in text and "\n" not in text


# Each dataset's local-training defaults, as measured (README, "Datasets"): closed values.
# digits' are the values every figure before `auto` was measured with.
EXPECTED_TRAINING = {
    # dataset: (lr, batch_size, local_epochs, local_steps, grad_clip_norm)
    "digits": (0.05, 8, 5, 0, 0.0),
    "mnist": (0.05, 32, 1, 0, 0.0),
    "fashion-mnist": (0.05, 32, 1, 0, 0.0),
    "femnist": (0.05, 16, 2, 0, 0.0),
    "har": (0.05, 16, 2, 0, 1.0),
    "shakespeare": (0.5, 32, 1, 50, 1.0),
    "heart": (0.01, 8, 5, 0, 0.0),
    "cifar10": (0.05, 32, 1, 0, 0.0),
}


@pytest.mark.parametrize("dataset", list(EXPECTED_TRAINING))
def test_auto_resolves_to_the_datasets_defaults(dataset: str) -> None:
    from fedge.data import SPECS

    t = RunConfig(dataset=dataset).training(SPECS[dataset])
    assert (t.lr, t.batch_size, t.local_epochs, t.local_steps, t.grad_clip_norm) == EXPECTED_TRAINING[dataset]


def test_every_builtin_dataset_has_expected_training_defaults() -> None:
    from fedge.data import DATASETS

    assert set(EXPECTED_TRAINING) == set(DATASETS)


def test_digits_defaults_are_unchanged() -> None:
    from fedge.data import SPECS
    from fedge.records import BATCH_SIZE, GRAD_CLIP_NORM, LOCAL_EPOCHS, LOCAL_STEPS, LR, MOMENTUM

    cfg = RunConfig()
    assert (cfg.lr, cfg.batch_size, cfg.local_epochs, cfg.local_steps, cfg.grad_clip_norm) == ("auto",) * 5
    assert cfg.train_settings(SPECS["digits"]) == {
        LR: 0.05,
        MOMENTUM: 0.9,
        LOCAL_EPOCHS: 5,
        LOCAL_STEPS: 0,
        BATCH_SIZE: 8,
        GRAD_CLIP_NORM: 0.0,
    }


def test_each_explicit_value_overrides_only_its_own_auto() -> None:
    from fedge.data import SPECS

    cfg = RunConfig.from_mapping({"dataset": "shakespeare", "local-epochs": "3", "lr": 0.1})
    t = cfg.training(SPECS["shakespeare"])
    # lr and epochs as given; batch, the step cap and clipping stay the dataset's.
    assert (t.lr, t.batch_size, t.local_epochs, t.local_steps, t.grad_clip_norm) == (0.1, 32, 3, 50, 1.0)
    lifted = RunConfig.from_mapping({"dataset": "shakespeare", "local-steps": 0, "grad-clip-norm": "0"})
    t = lifted.training(SPECS["shakespeare"])
    assert (t.local_steps, t.grad_clip_norm) == (0, 0.0)


def test_auto_round_trips_through_text_and_toml(tmp_path: Path) -> None:
    cfg = RunConfig.from_mapping({"lr": " auto ", "batch-size": "32", "local-steps": "auto"})
    assert (cfg.lr, cfg.batch_size, cfg.local_steps) == ("auto", 32, "auto")
    assert isinstance(RunConfig.from_mapping({"lr": 1}).lr, float)
    (tmp_path / "c.toml").write_text('lr = "auto"\nbatch-size = 16\ngrad-clip-norm = 2\n')
    from_file = RunConfig.from_toml(tmp_path / "c.toml")
    assert (from_file.lr, from_file.batch_size, from_file.grad_clip_norm) == ("auto", 16, 2.0)
    assert RunConfig.from_mapping(from_file.to_mapping()) == from_file
