"""The `sepp` command: one subcommand per stage of the data flow.

Each subcommand has a typed config dataclass. Values come from its defaults, then a YAML file
(``--config``), then ``key=value`` arguments (dotted keys for nested sections); ``--help`` lists
every key with its type, default and meaning. User errors print one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sepp_ray import config as cfg
from sepp_ray.config import opt
from sepp_ray.console import VERBOSE_ENV, log_path_for, quiet, say, verbose_from_env
from sepp_ray.curate.command import CurateConfig, run_curate
from sepp_ray.data.ingest import ImageOptions
from sepp_ray.data.sources import FORMATS, SourceOptions
from sepp_ray.errors import SeppError
from sepp_ray.eval.command import EvalConfig
from sepp_ray.mining.encoder import EncoderConfig
from sepp_ray.mining.mine import MineConfig
from sepp_ray.pipeline import PipelineConfig
from sepp_ray.sweep import SweepConfig
from sepp_ray.train.driver import PretrainConfig

log = logging.getLogger("sepp")


@dataclass
class IngestConfig:
    source: str = opt(
        "",
        "a path or URI (ImageFolder, CIFAR, STL-10, Parquet) or a built-in "
        "source: digits, synthetic",
    )
    out: str = opt("", "output URI: a local path, file:// or s3://bucket/prefix")
    format: str = opt("auto", f"source format: {', '.join(FORMATS)}")
    overwrite: bool = opt(False, "replace a complete output already at `out`")
    images: ImageOptions = field(
        default_factory=ImageOptions, metadata={"help": "image validation and storage"}
    )
    source_options: SourceOptions = field(
        default_factory=SourceOptions, metadata={"help": "options of each source kind"}
    )


@dataclass
class InspectConfig:
    uri: str = opt("", "a dataset URI (the output of `sepp ingest`)")
    grid: str | None = opt(
        None, "where to write the PNG grid of samples (default: <uri>/inspect/samples.png)"
    )
    per_class: int = opt(8, "images per class row in the grid")
    json: bool = opt(False, "print the whole manifest as JSON instead of a summary")


def run_ingest(c: IngestConfig) -> int:
    from sepp_ray.data.ingest import ingest
    from sepp_ray.data.sources import open_source

    if not c.source or not c.out:
        raise SeppError("ingest needs SOURCE and OUT (see `sepp ingest --help`)")
    source = open_source(c.source, c.format, c.source_options)
    manifest = ingest(source, c.out, c.images, overwrite=c.overwrite, config=cfg.to_dict(c))
    splits = ", ".join(f"{k} {v['total']}" for k, v in manifest["splits"].items())
    say(
        f"ingested {manifest['num_images']} images ({splits}; "
        f"{manifest['skipped']['count']} skipped) into {c.out}"
    )
    return 0


def run_inspect(c: InspectConfig) -> int:
    from sepp_ray.data.dataset import ImageDataset
    from sepp_ray.data.inspect import sample_grid, save_png, summary_text

    if not c.uri:
        raise SeppError("inspect needs a dataset URI (see `sepp inspect --help`)")
    ds = ImageDataset.open(c.uri)
    say(json.dumps(ds.manifest, indent=2) if c.json else summary_text(c.uri, ds.manifest))
    # inside the dataset's own location: inspecting from another folder leaves nothing there
    grid = c.grid or f"{c.uri.rstrip('/')}/inspect/samples.png"
    save_png(sample_grid(ds, per_class=c.per_class), grid)
    say(f"sample grid: {grid}")
    return 0


@dataclass
class EmbedConfig:
    dataset: str = opt("", "an image dataset URI (the output of `sepp ingest`)")
    out: str = opt("", "output URI of the embeddings")
    splits: list[str] = opt([], "splits to embed, comma-separated (default: all)")
    actors: int | None = opt(None, "embedding actors (default: one per GPU, else up to 4 CPU)")
    rows_per_file: int = opt(100_000, "embeddings per Parquet file (the unit of key sharding)")
    overwrite: bool = opt(False, "replace a complete output already at `out`")
    encoder: EncoderConfig = field(default_factory=EncoderConfig)


@dataclass
class MineCommandConfig:
    input: str = opt(
        "",
        "an image dataset (embedded first, into OUT/embeddings) or an "
        "embeddings location (the output of `sepp embed`)",
    )
    out: str = opt("", "output URI of the pairs")
    splits: list[str] = opt(["train"], "splits to mine when the input is an image dataset")
    actors: int | None = opt(None, "embedding actors (default: one per GPU, else up to 4 CPU)")
    rows_per_file: int = opt(100_000, "embeddings per Parquet file (the unit of key sharding)")
    overwrite: bool = opt(False, "replace a complete output already at `out`")
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    mining: MineConfig = field(default_factory=MineConfig)


@dataclass
class PairsReportConfig:
    pairs: str = opt("", "a pairs location (the output of `sepp mine`)")
    out: str | None = opt(None, "where the PNGs and report.md go (default: ./runs/reports/<name>)")
    rows: int = opt(8, "anchors shown in the grid")
    per_row: int = opt(4, "positives shown per anchor")


def run_embed(c: EmbedConfig) -> int:
    from sepp_ray.mining.embed import embed

    if not c.dataset or not c.out:
        raise SeppError("embed needs DATASET and OUT (see `sepp embed --help`)")
    m = embed(
        c.dataset,
        c.out,
        c.encoder,
        splits=c.splits or None,
        actors=c.actors,
        overwrite=c.overwrite,
        rows_per_file=c.rows_per_file,
    )
    say(
        f"embedded {m['num_embeddings']} images ({m['dim']}-d, {m['encoder']['identity']}) "
        f"into {c.out}"
    )
    return 0


def run_mine(c: MineCommandConfig) -> int:
    from sepp_ray.mining.pipeline import mine_command

    if not c.input or not c.out:
        raise SeppError("mine needs INPUT and OUT (see `sepp mine --help`)")
    m = mine_command(
        c.input,
        c.out,
        c.encoder,
        c.mining,
        splits=c.splits,
        actors=c.actors,
        overwrite=c.overwrite,
        config=cfg.to_dict(c),
        rows_per_file=c.rows_per_file,
    )
    prec = (m.get("precision") or {}).get("overall")
    say(
        f"mined {m['num_pairs']} pairs for {m['anchors_with_positive']} of {m['k']} anchors "
        f"(N={m['n']}, [{m['lo']}, {m['hi']}]"
        + (f", pair precision {prec:.3f}" if prec is not None else "")
        + f") into {c.out}"
    )
    return 0


def run_pairs_report(c: PairsReportConfig) -> int:
    from sepp_ray.mining.pairs_report import write_report

    if not c.pairs:
        raise SeppError("pairs-report needs a pairs URI (see `sepp pairs-report --help`)")
    name = os.path.basename(c.pairs.rstrip("/")) or "pairs"
    out = c.out or os.path.join("runs", "reports", name)
    for path in write_report(c.pairs, out, rows=c.rows, per_row=c.per_row):
        say(path)
    return 0


def run_pretrain(c: Any) -> int:
    from sepp_ray.train.driver import pretrain

    m = pretrain(c)
    fm = m.get("final_metrics") or {}
    knn = f", kNN top-1 {fm['knn_top1']:.3f}" if "knn_top1" in fm else ""
    say(
        f"pretrained {c.method} for {m['epochs']} epochs ({m['items']}) in "
        f"{m['wall_seconds']:.0f} s{knn}; checkpoint: {m['final_checkpoint']}"
    )
    return 0


def run_eval_command(c: Any) -> int:
    from sepp_ray.eval.command import run_eval

    run_eval(c)
    say(f"metrics: {c.out}/metrics.md and {c.out}/metrics.json")
    return 0


def run_pipeline_command(c: Any) -> int:
    from sepp_ray.pipeline import run_pipeline

    run_pipeline(c)  # its last line names the report
    return 0


def run_sweep_command(c: Any) -> int:
    from sepp_ray.sweep import run_sweep

    r = run_sweep(c)
    say(f"summary: {r['summary']}")
    return 0


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
        options=("port", "export", "host", "token"),
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
    return parser


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
    except SeppError as e:
        print(f"sepp: error: {e}", file=sys.stderr)
        return e.exit_code
    name = next(n for n, s in COMMANDS.items() if s is spec)
    verbose = verbose_from_env() or any(a in ("-v", "--verbose") for a in args)
    return _run_quietly(name, spec, config, verbose)


if __name__ == "__main__":
    sys.exit(main())
