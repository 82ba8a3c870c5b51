"""`fedge privacy calibrate`: the printed noise multiplier meets the target; bad input exits 2."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from fedge.cli import main
from fedge.privacy import PrivacyAccountant

DELTA = 1e-5
LINE = re.compile(
    r"^noise multiplier (?P<z>[0-9.]+) meets epsilon (?P<target>\S+) at delta (?P<delta>\S+) over "
    r"(?P<rounds>\d+) rounds \(sample rate (?P<q>\S+), (?P<how>[^,]+), (?P<kind>RDP|PLD) accountant "
    r"from dp_accounting\): epsilon (?P<eps>\S+)$"
)

# (argv, PrivacyAccountant arguments, rounds, target). PLD is slow at small noise multipliers, so
# its case is a few rounds at a large sample rate and a small target (a large multiplier).
CASES = {
    "rdp-poisson": (
        ["--target-epsilon", "8", "--rounds", "100", "--sample-rate", "0.01"],
        {"kind": "rdp", "sampling": "poisson", "sample_rate": 0.01},
        100,
        8.0,
    ),
    "pld-poisson": (
        ["--target-epsilon", "1", "--rounds", "3", "--sample-rate", "0.5", "--accountant", "pld"],
        {"kind": "pld", "sampling": "poisson", "sample_rate": 0.5},
        3,
        1.0,
    ),
    "rdp-fixed": (
        [
            "--target-epsilon",
            "4",
            "--rounds",
            "50",
            "--client-sampling",
            "fixed",
            "--population",
            "1000",
            "--cohort",
            "20",
        ],
        {"kind": "rdp", "sampling": "fixed", "population": 1000, "cohort": 20},
        50,
        4.0,
    ),
}


def _calibrate(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["privacy", "calibrate", "--delta", str(DELTA), *argv]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def _epsilon(z: float, accountant: dict[str, Any], rounds: int) -> float:
    kind, sampling = accountant["kind"], accountant["sampling"]
    rest = {k: v for k, v in accountant.items() if k not in ("kind", "sampling")}
    acc = PrivacyAccountant(kind, sampling, z, **rest)
    acc.step(rounds)
    return acc.epsilon(DELTA)


@pytest.mark.parametrize("case", list(CASES))
def test_printed_multiplier_meets_the_target(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv, accountant, rounds, target = CASES[case]
    out = _calibrate(argv, capsys)
    assert out.count("\n") == 1
    match = LINE.match(out.strip())
    assert match, out
    assert float(match["target"]) == target and float(match["delta"]) == DELTA
    assert int(match["rounds"]) == rounds
    assert match["kind"] == accountant["kind"].upper()
    q = accountant.get("sample_rate") or accountant["cohort"] / accountant["population"]
    assert float(match["q"]) == pytest.approx(q)
    if accountant["sampling"] == "poisson":
        assert match["how"] == "poisson sampling"
    else:
        assert (
            match["how"] == f"fixed sampling of {accountant['cohort']} of {accountant['population']} clients"
        )
    epsilon = _epsilon(float(match["z"]), accountant, rounds)
    assert epsilon <= target
    assert target - epsilon < 1e-3
    assert float(match["eps"]) == pytest.approx(epsilon, rel=1e-5)


def test_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv, accountant, rounds, target = CASES["rdp-fixed"]
    record = json.loads(_calibrate([*argv, "--json"], capsys))
    assert set(record) >= {
        "noise_multiplier",
        "epsilon",
        "delta",
        "rounds",
        "sample_rate",
        "sampling",
        "accountant",
    }
    assert record["delta"] == DELTA and record["rounds"] == rounds
    assert record["sampling"] == "fixed" and record["accountant"] == "rdp"
    assert record["sample_rate"] == pytest.approx(20 / 1000)
    assert (record["population"], record["cohort"]) == (1000, 20)
    epsilon = _epsilon(record["noise_multiplier"], accountant, rounds)
    assert record["epsilon"] == epsilon
    assert epsilon <= target and target - epsilon < 1e-3


GOOD = {"--target-epsilon": "8", "--delta": "1e-5", "--rounds": "10", "--sample-rate": "0.01"}


def _argv(**changes: str | None) -> list[str]:
    flags = dict(GOOD)
    for name, value in changes.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            flags.pop(flag, None)
        else:
            flags[flag] = value
    return ["privacy", "calibrate", *[item for pair in flags.items() for item in pair]]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (_argv(target_epsilon="0"), "--target-epsilon must be a finite number > 0, got 0"),
        (_argv(target_epsilon="-1"), "--target-epsilon must be a finite number > 0, got -1"),
        (_argv(target_epsilon="nan"), "--target-epsilon must be a finite number > 0"),
        (_argv(delta="0"), "--delta must be in (0, 1), got 0"),
        (_argv(delta="1"), "--delta must be in (0, 1), got 1"),
        (_argv(rounds="0"), "--rounds must be a whole number >= 1, got 0"),
        (_argv(sample_rate="0"), "--sample-rate must be in (0, 1], got 0"),
        (_argv(sample_rate="1.5"), "--sample-rate must be in (0, 1], got 1.5"),
        (_argv(sample_rate=None), "poisson sampling needs --sample-rate Q in (0, 1]"),
        (
            [*_argv(), "--population", "1000", "--cohort", "10"],
            "poisson sampling takes --sample-rate only; drop --population and --cohort",
        ),
        (
            [*_argv(sample_rate=None), "--client-sampling", "fixed"],
            "fixed sampling needs --population N and --cohort M",
        ),
        (
            [*_argv(sample_rate=None), "--client-sampling", "fixed", "--population", "1000"],
            "fixed sampling needs --population N and --cohort M",
        ),
        (
            [*_argv(sample_rate=None), "--client-sampling", "fixed", "--population", "10", "--cohort", "20"],
            "fixed sampling needs 1 <= --cohort <= --population",
        ),
        (
            [*_argv(sample_rate="0.5"), "--client-sampling", "fixed", "--population", "100", "--cohort", "1"],
            "--sample-rate 0.5 is not --cohort/--population = 1/100 = 0.01",
        ),
        (
            [
                *_argv(sample_rate=None),
                "--client-sampling",
                "fixed",
                "--population",
                "1000",
                "--cohort",
                "10",
                "--accountant",
                "pld",
            ],
            "does not support fixed-size sampling without replacement; use --accountant rdp",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("fedge: error: ") and captured.err.count("\n") == 1, captured.err
    assert fragment in captured.err and "Traceback" not in captured.err


@pytest.mark.parametrize(
    "argv",
    [
        _argv(target_epsilon=None),
        _argv(rounds="1.5"),
        _argv(accountant="moments"),
        [*_argv(), "--client-sampling", "uniform"],
    ],
)
def test_argparse_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fedge privacy calibrate: error: ") and err.count("\n") == 1, err


def test_calibration_failure_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # calibrate's own refusal (e.g. no multiplier up to its ceiling) is one line, exit 2.
    def refuse(*args: Any, **kwargs: Any) -> float:
        raise ValueError("no noise multiplier up to 1048576.0 reaches epsilon 1e-09 in 100 rounds")

    monkeypatch.setattr("fedge.privacy.calibrate", refuse)
    assert main(_argv()) == 2
    err = capsys.readouterr().err
    assert err == "fedge: error: no noise multiplier up to 1048576.0 reaches epsilon 1e-09 in 100 rounds\n"


# -- the budget stop, end to end through `fedge simulate` --------------------------------------
SIM = ["--num-clients", "6", "--clients-per-round", "3", "--local-epochs", "1", "--export-every", "off"]
DP = ["--dp", "central", "--client-sampling", "poisson", "--noise-multiplier", "1.5", "--quiet"]


def _spent(rounds: int) -> float:
    accountant = PrivacyAccountant("rdp", "poisson", 1.5, sample_rate=0.5)
    accountant.step(rounds)
    return accountant.epsilon(1e-5)


def test_simulate_stops_cleanly_at_the_budget(tmp_path: Any) -> None:
    budget = (_spent(2) + _spent(3)) / 2
    run = tmp_path / "run"
    argv = ["simulate", "--num-rounds", "6", *SIM, *DP, "--target-epsilon", str(budget), "--out", str(run)]
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert "round 3 would bring epsilon" in summary["stopped"]
    assert summary["privacy"]["epsilon"] == pytest.approx(_spent(2), rel=1e-9)
    assert [r["privacy"]["epsilon"] for r in summary["history"]] == pytest.approx([_spent(1), _spent(2)])


def test_simulate_refuses_a_budget_the_first_round_spends(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    argv = [
        "simulate",
        "--num-rounds",
        "2",
        *SIM,
        *DP,
        "--target-epsilon",
        str(_spent(1) / 2),
        "--out",
        str(run),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fedge: error: target-epsilon") and "first round alone" in err[-1]
