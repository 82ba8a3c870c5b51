"""`fedge` command line: bad input is one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedge.cli import main


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["simulate", "--dataset", "imagenet"], "unknown dataset 'imagenet'; choose one of: digits"),
        (["simulate", "--model", "resnet"], "unknown model 'resnet'"),
        (["simulate", "--strategy", "fedfoo"], "unknown strategy 'fedfoo'"),
        (["simulate", "--partition", "dirichlet:-1"], "dirichlet"),
        (["simulate", "--num-rounds", "0"], "num-rounds must be a positive whole number"),
        (["simulate", "--clients-per-round", "0"], "clients-per-round must be a positive whole number"),
        (["simulate", "--min-reply-fraction", "1.5"], "min-reply-fraction must be in (0, 1]"),
        (["simulate", "--dataset", "mnist", "--data-dir", "/nonexistent/fedge"], "/nonexistent/fedge"),
        (["simulate", "--num-round", "3"], "--num-round"),
        (["simulate", "--resume", "/nonexistent/run"], "no checkpoint"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main([*argv, "--out", str(tmp_path / "run"), "--quiet"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_config_file_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("num-rouns = 3\n")
    assert main(["simulate", "--config", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'num-rouns'; did you mean 'num-rounds'?" in err and err.count("\n") == 1


def test_console_script_reports_without_traceback(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("fedge")
    proc = subprocess.run(
        [str(exe), "simulate", "--strategy", "nope"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("fedge: error: unknown strategy 'nope'") and "Traceback" not in proc.stderr
