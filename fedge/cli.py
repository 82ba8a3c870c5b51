"""The ``fedge`` command line: the only module that sees every role.

``fedge simulate`` runs a federation on this machine; later commands (``server``,
``client``, ``export``, ``infer``, ``bench``, ``compare``) join it as subcommands.
Every bad input ends in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from fedge import __version__
from fedge.config import ConfigError, RunConfig, config_keys

EXIT_USAGE = 2
# The in-process engine could not run any client (workers that cannot start).
EXIT_ENGINE = 1


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line and no guessing of abbreviated flags."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``fedge`` parser with its subcommands."""
    parser = _Parser(prog="fedge", description="Federated learning for edge devices.")
    parser.add_argument("--version", action="version", version=f"fedge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sim = sub.add_parser(
        "simulate",
        help="run a simulated federation on this machine",
        description=(
            "Run a simulated federation. With no arguments: 50 clients over scikit-learn's "
            "digits (Dirichlet 0.5), a small CNN, FedAvg, 10 clients a round, 20 rounds."
        ),
    )
    sim.add_argument("--config", metavar="FILE.toml", help="config keys from a TOML file (flags override it)")
    sim.add_argument("--out", metavar="DIR", help="run folder (default: out-dir/run-name)")
    sim.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its checkpoint")
    sim.add_argument("--quiet", action="store_true", help="no progress display")
    sim.add_argument("--verbose", action="store_true", help="also show Flower's log")
    keys = sim.add_argument_group("config keys (as in [tool.flwr.app.config])")
    for key in config_keys():
        default = getattr(RunConfig(), key.replace("-", "_"))
        keys.add_argument(
            f"--{key}",
            dest=f"key:{key}",
            metavar="V",
            default=argparse.SUPPRESS,
            help=f"default: {default!r}",
        )
    sim.set_defaults(func=_cmd_simulate)

    keys_cmd = sub.add_parser("keys", help="signing keys for published models")
    keys_sub = keys_cmd.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    new = keys_sub.add_parser("new", help="make an Ed25519 key pair: DIR/signing.key (0600), DIR/signing.pub")
    new.add_argument("--out", required=True, metavar="DIR")
    new.set_defaults(func=_cmd_keys_new)

    deploy = sub.add_parser("deploy", help="the registry of published int8 models")
    deploy_sub = deploy.add_subparsers(dest="deploy_command", required=True, parser_class=_Parser)
    listing = deploy_sub.add_parser("list", help="published versions; * marks current")
    listing.add_argument("--registry", metavar="DIR", help="default: the newest runs/*/artifacts")
    listing.set_defaults(func=_cmd_deploy_list)
    rollback = deploy_sub.add_parser("rollback", help="move current back (to VERSION, or the previous one)")
    rollback.add_argument("version", nargs="?", help="e.g. round-0003 (default: the one before current)")
    rollback.add_argument("--registry", metavar="DIR", help="default: the newest runs/*/artifacts")
    rollback.set_defaults(func=_cmd_deploy_rollback)
    verify = deploy_sub.add_parser("verify", help="check a version's signature and file hashes")
    verify.add_argument(
        "artifact", metavar="DIR", help="a version folder, e.g. runs/NAME/artifacts/round-0020"
    )
    verify.add_argument("--public-key", required=True, metavar="KEY")
    verify.set_defaults(func=_cmd_deploy_verify)

    infer = sub.add_parser("infer", help="verify, install and run a published model (the device side)")
    infer.add_argument("--model", required=True, metavar="DIR", help="a version folder or a registry folder")
    infer.add_argument("--public-key", required=True, metavar="KEY", help="the pinned signing public key")
    infer.add_argument("--input", metavar="FILE.npy", help="inputs, shaped (N, *input_shape)")
    infer.add_argument("--benchmark", action="store_true", help="print latency p50/p95/p99 and model size")
    infer.add_argument(
        "--install-dir", metavar="DIR", help="where the device keeps versions (default: temporary)"
    )
    infer.add_argument(
        "--allow-rollback",
        action="store_true",
        help="install even if the release is not newer than the installed one (an explicit rollback)",
    )
    infer.set_defaults(func=_cmd_infer)

    privacy = sub.add_parser("privacy", help="differential-privacy budgets (user-level DP-FedAvg)")
    privacy_sub = privacy.add_subparsers(dest="privacy_command", required=True, parser_class=_Parser)
    cal = privacy_sub.add_parser(
        "calibrate",
        help="the noise multiplier that meets a target epsilon",
        description=(
            "The smallest noise multiplier z (noise std z * C on the sum of updates clipped to C) "
            "whose epsilon at --delta after --rounds sampled Gaussian rounds is at most "
            "--target-epsilon, by dp_accounting's RDP or PLD accountant."
        ),
    )
    cal.add_argument("--target-epsilon", required=True, type=float, metavar="E")
    cal.add_argument("--delta", required=True, type=float, metavar="D", help="in (0, 1)")
    cal.add_argument("--rounds", required=True, type=int, metavar="R", help="rounds of training (>= 1)")
    cal.add_argument(
        "--sample-rate",
        type=float,
        metavar="Q",
        help="Poisson probability of a client joining a round, in (0, 1] (fixed: cohort/population)",
    )
    cal.add_argument("--accountant", choices=("rdp", "pld"), default="rdp", help="default: rdp")
    cal.add_argument(
        "--client-sampling",
        choices=("poisson", "fixed"),
        default="poisson",
        help="poisson (add/remove a client) or fixed cohorts without replacement (replace a client)",
    )
    cal.add_argument("--population", type=int, metavar="N", help="fixed sampling: number of clients")
    cal.add_argument("--cohort", type=int, metavar="M", help="fixed sampling: clients a round")
    cal.add_argument("--json", action="store_true", help="print a JSON object instead of a sentence")
    cal.set_defaults(func=_cmd_privacy_calibrate)
    return parser


def _flag_values(args: argparse.Namespace) -> dict[str, Any]:
    return {name[4:]: value for name, value in vars(args).items() if name.startswith("key:")}


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(show_time=False, show_path=False, markup=False)
    # Root at WARNING: libraries (ONNX Runtime's quantizer, ...) log chatty INFO there.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    if not verbose:
        # Flower logs every configure/aggregate call; fedge's table already shows the round.
        for name in ("flwr", "ray"):
            logging.getLogger(name).setLevel(logging.WARNING)
            logging.getLogger(name).propagate = True


def _cmd_simulate(args: argparse.Namespace) -> int:
    from fedge.server.checkpoint import load_checkpoint
    from fedge.server.run_folder import default_run_dir
    from fedge.simulation.runner import simulate

    flags = _flag_values(args)
    run_dir: Path | None = Path(args.out) if args.out else None
    if args.resume:
        run_dir = Path(args.resume)
        base = RunConfig.from_mapping(load_checkpoint(run_dir).config)
        # A resumed run continues in its own folder; another --out would be ignored.
        if args.out and Path(args.out).resolve() != run_dir.resolve():
            raise ConfigError(
                f"--resume {args.resume} continues the run in its own folder, but --out names "
                f"{args.out}; drop --out (or copy the run folder there and resume that)"
            )
    else:
        base = RunConfig()
    if args.config:
        base = RunConfig.from_toml(args.config, base)
    cfg = RunConfig.from_mapping(flags, base)
    if run_dir is None:
        run_dir = default_run_dir(cfg)

    _setup_logging(args.verbose)
    # The round table shows each round; fedge's own log then only needs warnings.
    logging.getLogger("fedge").setLevel(logging.INFO if args.verbose else logging.WARNING)
    progress = None
    hooks = []
    if not args.quiet:
        from fedge.simulation.display import RichProgress

        progress = RichProgress()
        hooks.append(progress)
    try:
        summary = simulate(cfg, run_dir, resume=bool(args.resume), hooks=hooks)
    finally:
        if progress is not None:
            progress.stop()
    final = summary["final"]
    acc = "n/a" if final["accuracy"] is None else f"{final['accuracy']:.4f}"
    print(
        f"fedge: {summary['rounds_completed']} rounds, final accuracy {acc}, "
        f"{summary['wall_s']:.1f} s, up {summary['bytes_up_total']} B, down {summary['bytes_down_total']} B"
    )
    print(f"fedge: run folder {run_dir}")
    return 0


def _cmd_keys_new(args: argparse.Namespace) -> int:
    from fedge.deploy.artifacts import generate_keypair

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    private, public = generate_keypair(out)
    print(f"fedge: wrote {private} (private, mode 0600) and {public}")
    return 0


def _registry_dir(arg: str | None) -> Path:
    """``--registry``, or the registry of the newest run folder under ``out-dir``."""
    if arg:
        return Path(arg)
    out_dir = Path(RunConfig().out_dir)
    found = sorted(out_dir.glob("*/artifacts/current"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError(f"no published model under {out_dir}/*/artifacts; pass --registry DIR")
    print(f"fedge: registry {found[-1].parent}", file=sys.stderr)
    return found[-1].parent


def _cmd_deploy_list(args: argparse.Namespace) -> int:
    from fedge.deploy.registry import Registry

    registry = Registry(_registry_dir(args.registry))
    current = registry.current()
    for version in registry.versions():
        print(f"{'*' if version == current else ' '} {version}")
    return 0


def _cmd_deploy_rollback(args: argparse.Namespace) -> int:
    from fedge.deploy.registry import Registry

    print(f"fedge: current is now {Registry(_registry_dir(args.registry)).rollback(args.version)}")
    return 0


def _cmd_deploy_verify(args: argparse.Namespace) -> int:
    from fedge.deploy.artifacts import load_public_key, verify_artifact

    manifest = verify_artifact(Path(args.artifact), load_public_key(Path(args.public_key)))
    print(
        f"fedge: {manifest['version']} verified: signature and {len(manifest['files'])} file hash(es) match"
    )
    return 0


def _cmd_infer(args: argparse.Namespace) -> int:
    import json
    import tempfile

    import numpy as np

    from fedge.deploy.artifacts import load_public_key
    from fedge.deploy.runtime import DeviceRuntime

    if not args.input and not args.benchmark:
        raise ConfigError("nothing to do: pass --input FILE.npy, --benchmark, or both")
    with tempfile.TemporaryDirectory(prefix="fedge-device-") as tmp:
        runtime = DeviceRuntime(Path(args.install_dir or tmp), load_public_key(Path(args.public_key)))
        version = runtime.install(Path(args.model), allow_rollback=args.allow_rollback)
        print(
            f"fedge: installed {version} as {runtime.current_install()} (signature and hashes verified)",
            file=sys.stderr,
        )
        if args.input:
            try:
                x = np.load(args.input, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise ConfigError(
                    f"cannot read --input {args.input}: {err}; save it with numpy.save"
                ) from None
            try:
                predictions = runtime.predict(x)
            except Exception as err:  # onnxruntime's errors are long; the cause is the input
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ConfigError(
                    f"the model cannot run on {args.input} (shape {tuple(x.shape)}, {x.dtype}): {first}; "
                    "inputs are shaped (N, *input_shape)"
                ) from None
            print(" ".join(str(int(c)) for c in predictions))
        if args.benchmark:
            print(json.dumps(runtime.benchmark(), indent=2))
    return 0


def _privacy_arguments(args: argparse.Namespace) -> tuple[float | None, int | None, int | None]:
    """Check ``fedge privacy calibrate``'s flags; return (sample_rate, population, cohort) for calibrate."""
    import math

    eps, delta, rounds = args.target_epsilon, args.delta, args.rounds
    if not (math.isfinite(eps) and eps > 0):
        raise ConfigError(f"--target-epsilon must be a finite number > 0, got {eps:g}")
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"--delta must be in (0, 1), got {delta:g}; e.g. --delta 1e-5")
    if rounds < 1:
        raise ConfigError(f"--rounds must be a whole number >= 1, got {rounds}")
    q, population, cohort = args.sample_rate, args.population, args.cohort
    if q is not None and not 0.0 < q <= 1.0:
        raise ConfigError(f"--sample-rate must be in (0, 1], got {q:g}")
    if args.client_sampling == "poisson":
        if population is not None or cohort is not None:
            raise ConfigError(
                "poisson sampling takes --sample-rate only; drop --population and --cohort "
                "(or pass --client-sampling fixed)"
            )
        if q is None:
            raise ConfigError("poisson sampling needs --sample-rate Q in (0, 1]")
        return q, None, None
    if args.accountant == "pld":
        raise ConfigError(
            "the PLD accountant (dp_accounting) does not support fixed-size sampling without "
            "replacement; use --accountant rdp, or --client-sampling poisson"
        )
    if population is None or cohort is None:
        raise ConfigError("fixed sampling needs --population N and --cohort M (sample rate M/N)")
    if not 1 <= cohort <= population:
        raise ConfigError(
            f"fixed sampling needs 1 <= --cohort <= --population, got --cohort {cohort} "
            f"--population {population}"
        )
    if q is not None and not math.isclose(q, cohort / population, rel_tol=1e-9):
        raise ConfigError(
            f"--sample-rate {q:g} is not --cohort/--population = {cohort}/{population} = "
            f"{cohort / population:g}; drop --sample-rate for fixed sampling"
        )
    return None, population, cohort


def _round_up(value: float, digits: int = 6) -> tuple[float, str]:
    """``value`` rounded up to ``digits`` significant digits (a larger noise multiplier is safe)."""
    import math

    decimals = max(0, digits - 1 - math.floor(math.log10(value)))
    text = f"{math.ceil(value * 10**decimals) / 10**decimals:.{decimals}f}"
    return float(text), text


def _cmd_privacy_calibrate(args: argparse.Namespace) -> int:
    import json

    from fedge.privacy import PrivacyAccountant, calibrate

    sample_rate, population, cohort = _privacy_arguments(args)
    kind, sampling = args.accountant, args.client_sampling
    try:
        z = calibrate(
            args.target_epsilon,
            args.delta,
            args.rounds,
            sample_rate,
            kind=kind,
            sampling=sampling,
            population=population,
            cohort=cohort,
        )
    except ValueError as err:  # no multiplier reaches the target, or a config calibrate refuses
        raise ConfigError(str(err)) from None
    # The printed multiplier is rounded up, so it still meets the target; the epsilon shown is
    # the one of the printed multiplier (JSON keeps the full float).
    shown, text = (z, repr(z)) if args.json else _round_up(z)
    accountant = PrivacyAccountant(kind, sampling, shown, sample_rate, population, cohort)
    accountant.step(args.rounds)
    epsilon = accountant.epsilon(args.delta)
    if sample_rate is not None:
        q = sample_rate
    else:
        assert population is not None and cohort is not None
        q = cohort / population
    if args.json:
        record = {
            "noise_multiplier": z,
            "epsilon": epsilon,
            "delta": args.delta,
            "rounds": args.rounds,
            "sample_rate": q,
            "sampling": sampling,
            "accountant": kind,
            "population": population,
            "cohort": cohort,
        }
        print(json.dumps(record))
        return 0
    how = (
        "poisson sampling" if sampling == "poisson" else f"fixed sampling of {cohort} of {population} clients"
    )
    print(
        f"noise multiplier {text} meets epsilon {args.target_epsilon:g} at delta {args.delta:g} "
        f"over {args.rounds} rounds (sample rate {q:g}, {how}, {kind.upper()} accountant from "
        f"dp_accounting): epsilon {epsilon:.6g}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fedge`` command; return its exit status."""
    from fedge.data import DataError
    from fedge.deploy.artifacts import ArtifactError
    from fedge.deploy.registry import RegistryError
    from fedge.models import ModelError
    from fedge.server.checkpoint import CheckpointError
    from fedge.server.loop import RunFailedError
    from fedge.server.transport import FederationTooSmallError
    from fedge.simulation.grid import EngineError

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0].split("=")[0]
        options = [f"--{k}" for k in config_keys()] + [
            "--config",
            "--out",
            "--resume",
            "--quiet",
            "--verbose",
        ]
        close = difflib.get_close_matches(flag, options, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        parser.error(f"unknown option {flag!r}{hint}")
    try:
        return int(args.func(args))
    except (ConfigError, DataError, ModelError, CheckpointError, ArtifactError, RegistryError) as err:
        print(f"fedge: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (RunFailedError, FederationTooSmallError) as err:  # nothing worked: a failed run
        print(f"fedge: error: {err}", file=sys.stderr)
        return EXIT_ENGINE
    except EngineError as err:  # the simulation engine itself failed: not a usage error
        print(f"fedge: error: {err}", file=sys.stderr)
        return EXIT_ENGINE
    except OSError as err:  # a path that is a folder, unwritable, missing, ...
        print(f"fedge: error: {err.strerror or err}: {err.filename or ''}; check the path", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(
            "fedge: interrupted; the last completed round is checkpointed (resume with --resume)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
