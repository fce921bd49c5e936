"""The `sepp` command: one subcommand per stage of the data flow.

Each subcommand has a typed config dataclass. Values come from its defaults, then a YAML file
(``--config``), then ``key=value`` arguments (dotted keys for nested sections); ``--help`` lists
every key with its type, default and meaning. User errors print one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sepp_ray import config as cfg
from sepp_ray.console import VERBOSE_ENV, log_path_for, quiet, say, verbose_from_env
from sepp_ray.curate.command import CurateConfig, run_curate
from sepp_ray.data.command import IngestConfig, InspectConfig, run_ingest, run_inspect
from sepp_ray.errors import SeppError
from sepp_ray.eval.command import EvalConfig, run_eval_command
from sepp_ray.flow.pipeline import PipelineConfig, run_pipeline_command
from sepp_ray.mining.command import (
    EmbedConfig,
    MineCommandConfig,
    PairsReportConfig,
    run_embed,
    run_mine,
    run_pairs_report,
)
from sepp_ray.train.command import run_pretrain
from sepp_ray.train.driver import PretrainConfig
from sepp_ray.tune.space import SweepConfig
from sepp_ray.tune.sweep import run_sweep_command

log = logging.getLogger("sepp")


@dataclass(frozen=True)
class Command:
    config_cls: type
    run: Callable[[Any], int]
    positionals: tuple[str, ...]
    summary: str
    flags: tuple[str, ...] = ()  # boolean keys also offered as --flag
    options: tuple[str, ...] = ()  # valued keys also offered as --key VALUE


COMMANDS: dict[str, Command] = {
    "ingest": Command(
        IngestConfig,
        run_ingest,
        ("source", "out"),
        "turn images into Parquet shards + manifest",
        ("overwrite",),
    ),
    "inspect": Command(
        InspectConfig,
        run_inspect,
        ("uri",),
        "print a dataset's manifest and write a PNG grid of samples",
        ("json",),
    ),
    "embed": Command(
        EmbedConfig,
        run_embed,
        ("dataset", "out"),
        "embed images with a frozen encoder (Parquet + manifest)",
        ("overwrite",),
    ),
    "mine": Command(
        MineCommandConfig,
        run_mine,
        ("input", "out"),
        "mine semantic positive pairs (embeds first when given images)",
        ("overwrite",),
    ),
    "pretrain": Command(
        PretrainConfig,
        run_pretrain,
        ("dataset", "out"),
        "SSL pretraining with semantic positive pairs on Ray Train",
        ("overwrite",),
    ),
    "eval": Command(
        EvalConfig,
        run_eval_command,
        ("dataset", "out"),
        "evaluate checkpoints: knn, linear, semisup, detection; one comparison table",
        ("overwrite",),
    ),
    "pipeline": Command(
        PipelineConfig,
        run_pipeline_command,
        ("source",),
        "ingest -> bootstrap -> mine -> pretrain baseline and SePP -> eval -> report",
    ),
    "sweep": Command(
        SweepConfig,
        run_sweep_command,
        ("source",),
        "Ray Tune + ASHA over thresholds, K, method, backbone, lr, temperature; summary, plots",
    ),
    "curate": Command(
        CurateConfig,
        run_curate,
        ("pairs",),
        "review mined pairs in the browser; export the accepted ones for pretraining",
        options=("port", "export", "host"),
    ),
    "pairs-report": Command(
        PairsReportConfig,
        run_pairs_report,
        ("pairs",),
        "PNG grid of pairs, similarity histogram, precision curve",
    ),
}


def _help_table(cls: type) -> str:
    rows = cfg.describe(cls)
    width = max(len(k) for k, *_ in rows)
    lines = ["config keys (set as key=value, or in a YAML file given with --config):"]
    for key, tp, default, text in rows:
        lines.append(f"  {key:<{width}}  {text} [{tp}, default {default}]")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sepp",
        description="Self-supervised learning with semantic positive pairs, on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, spec in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=spec.summary,
            description=spec.summary,
            epilog=_help_table(spec.config_cls),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for pos in spec.positionals:
            p.add_argument(pos, nargs="?", help=f"= {pos}=... (see below)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
        p.add_argument("--config", help="YAML file of config keys")
        for flag in spec.flags:
            p.add_argument(
                f"--{flag.replace('_', '-')}",
                dest=f"flag_{flag}",
                action="store_true",
                help=f"same as {flag}=true",
            )
        for key in spec.options:
            p.add_argument(
                f"--{key.replace('_', '-')}",
                dest=f"flag_{key}",
                metavar=key.upper(),
                help=f"same as {key}=...",
            )
        if "format" in {f for f, *_ in cfg.describe(spec.config_cls)}:
            p.add_argument("--format", dest="flag_format", help="same as format=...")
        if name in DRY_RUN:
            _add_dry_run(p)
    return parser


# commands that print their plan with --dry-run instead of running (sepp_ray.flow.dryrun)
DRY_RUN = ("pipeline", "pretrain")


def _add_dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dry-run",
        dest="dry_run",
        action="store_true",
        help="print every stage, its resources, wall time and GPU-hours; start nothing",
    )
    p.add_argument(
        "--hardware",
        dest="dry_hardware",
        metavar="GPUxN",
        help="the plan's hardware: h100x8, a100x32, ... (default: H100s, one a worker)",
    )
    p.add_argument(
        "--data-size",
        dest="dry_data_size",
        metavar="NAME|N",
        help="the plan's data where it cannot be read here: cifar10, stl10, imagenet100, "
        "imagenet, or the training split's image count",
    )


def dry_run_request(argv: list[str]) -> tuple[str | None, str | None] | None:
    """(hardware, data size) when ``argv`` asks for a dry run, else None."""
    args, _ = build_parser().parse_known_args(argv)
    plan = (getattr(args, "dry_hardware", None), getattr(args, "dry_data_size", None))
    if getattr(args, "dry_run", False):
        return plan
    if any(plan):
        raise SeppError("--hardware and --data-size describe a plan: add --dry-run")
    return None


def parse_config(argv: list[str]) -> tuple[Command, Any]:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if "=" not in a or a.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if args.command is None:
        parser.print_help()
        raise SystemExit(2)
    spec = COMMANDS[args.command]
    overrides = list(args.overrides) + extra
    # positionals that look like key=value are overrides given early
    base: dict[str, Any] = {}
    for pos in spec.positionals:
        value = getattr(args, pos)
        if value is None:
            continue
        if (
            "=" in value
            and value.split("=", 1)[0].replace(".", "").replace("_", "").isalnum()
            and "://" not in value.split("=", 1)[0]
        ):
            overrides.insert(0, value)
        else:
            base[pos] = value
    for key, value in vars(args).items():
        if key.startswith("flag_") and value not in (None, False):
            overrides.append(f"{key[5:]}={value}")
    if args.verbose:
        logging.getLogger().setLevel(logging.DEBUG)
    return spec, cfg.load(spec.config_cls, args.config, overrides, command_line=base)


# commands that start Ray: their console is quiet, Ray's output goes to a log file
RAY_COMMANDS = ("ingest", "embed", "mine", "pretrain", "eval", "pipeline", "sweep")


def _run_quietly(name: str, spec: Command, config: Any, verbose: bool) -> int:
    """Run a command with Ray's output in its log file (see sepp_ray.console)."""
    out = getattr(config, "work", None) or getattr(config, "out", None) or ""
    path = log_path_for(str(out), name) if name in RAY_COMMANDS else None
    with quiet(path, verbose) as log_file:
        if log_file:
            say(f"Ray logs: {log_file} (--verbose or {VERBOSE_ENV}=1 shows them here)")
        try:
            return spec.run(config)
        except SeppError as e:
            if log_file:
                print(f"sepp: error: {e}", file=sys.stderr, flush=True)  # for the log
            say(f"sepp: error: {e}", err=True)
            return e.exit_code
        except Exception:
            if log_file:  # the traceback follows on the console, Ray's side of it is in the log
                say(f"sepp: {name} failed; Ray's output is in {log_file}", err=True)
            raise


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:] if argv is None else argv
    try:
        spec, config = parse_config(args)
        name = next(n for n, s in COMMANDS.items() if s is spec)
        plan = dry_run_request(args)
        if plan is not None:
            from sepp_ray.flow.dryrun import dry_run

            return dry_run(name, config, *plan)
    except SeppError as e:
        print(f"sepp: error: {e}", file=sys.stderr)
        return e.exit_code
    verbose = verbose_from_env() or any(a in ("-v", "--verbose") for a in args)
    return _run_quietly(name, spec, config, verbose)


if __name__ == "__main__":
    sys.exit(main())
