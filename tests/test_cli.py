"""`fedge` command line: bad input is one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import os
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


TINY = ["--num-clients", "4", "--clients-per-round", "2", "--local-epochs", "1", "--workers", "1", "--quiet"]


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("fedge: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_more_clients_than_samples_is_refused_before_round_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert (
        main(["simulate", "--num-clients", "5000", "--clients-per-round", "2", "--out", str(out), "--quiet"])
        == 2
    )
    # digits: 1797 samples, 20% held out for the test split: 1797 - ceil(0.2 * 1797) = 1437.
    err = _one_line_error(capsys)
    assert "num-clients=5000 is more than the 1437 training samples of digits" in err
    assert not (out / "metrics.jsonl").exists()


def test_resume_refuses_fewer_rounds_and_another_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(["simulate", "--num-rounds", "2", *TINY, "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["simulate", "--resume", str(run), "--num-rounds", "1", "--quiet"]) == 2
    assert "num-rounds=1 is below the 2 rounds" in _one_line_error(capsys)
    assert main(["simulate", "--resume", str(run), "--out", str(tmp_path / "other"), "--quiet"]) == 2
    assert "--out names" in _one_line_error(capsys)
    assert not (tmp_path / "other").exists()
    # --out naming the run's own folder is the same run.
    assert main(["simulate", "--resume", str(run), "--out", str(run), "--num-rounds", "3", "--quiet"]) == 0


def test_config_file_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "latin1.toml"
    bad.write_bytes("run-name = 'caf\u00e9'\n".encode("latin-1"))
    assert main(["simulate", "--config", str(bad), "--quiet"]) == 2
    err = _one_line_error(capsys)
    # é is byte 15 (0-based) of "run-name = 'café'"; latin-1 writes it as 0xe9.
    assert "is not UTF-8 text (byte 0xe9 at offset 15)" in err


def test_unreadable_checkpoints_are_told_apart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "dir-ckpt"
    (folder / "checkpoint.safetensors").mkdir(parents=True)
    assert main(["simulate", "--resume", str(folder), "--quiet"]) == 2
    assert "is not a regular file" in _one_line_error(capsys)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "checkpoint.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    assert main(["simulate", "--resume", str(corrupt), "--quiet"]) == 2
    assert "is corrupt, not a safetensors file" in _one_line_error(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file")
def test_a_checkpoint_without_read_permission(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "checkpoint.safetensors").write_bytes(b"x")
    (tmp_path / "checkpoint.safetensors").chmod(0)
    assert main(["simulate", "--resume", str(tmp_path), "--quiet"]) == 2
    assert "cannot be read (Permission denied); give this user read permission" in _one_line_error(capsys)


def test_a_second_run_on_a_locked_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from fedge.server.run_lock import run_lock\n"
            f"with run_lock({str(run)!r}):\n"
            "    print('locked', flush=True)\n"
            "    time.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert main(["simulate", "--num-rounds", "1", *TINY, "--out", str(run)]) == 2
        err = _one_line_error(capsys)
        assert f"run folder {run} is in use by another fedge run (pid {holder.pid})" in err
        assert not (run / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # The lock dies with its holder: the folder is free again.
    assert main(["simulate", "--num-rounds", "1", *TINY, "--out", str(run)]) == 0


def test_an_engine_that_cannot_start_exits_1_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedge.simulation.runner as runner

    monkeypatch.setattr(runner, "CLIENT_APP_REF", "fedge_no_such_module:app")
    assert main(["simulate", "--num-rounds", "1", *TINY, "--out", str(tmp_path / "run")]) == 1
    err = _one_line_error(capsys)
    assert "client app fedge_no_such_module:app cannot start in a worker process" in err


def test_a_run_in_which_no_round_aggregated_fails_with_one_line(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    # max-examples-per-client 1: every digits client (dozens of samples) claims more and is
    # dropped, so no round aggregates: exit 1 and one line, not "success" with zero clients.
    from fedge.cli import main

    status = main(
        [
            "simulate", "--quiet", "--out", str(tmp_path / "run"), "--num-rounds", "2", "--num-clients", "4",
            "--clients-per-round", "2", "--local-epochs", "1", "--export-every", "off", "--workers", "1",
            "--max-examples-per-client", "1",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert err[-1].startswith("fedge: error: no round aggregated an update: all 2 rounds failed")
    assert (tmp_path / "run" / "summary.json").is_file()  # the run folder is still written
