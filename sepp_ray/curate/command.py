"""`sepp curate PAIRS`: the config and the command (server imports stay lazy: `sepp --help`
must not pay for them)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from sepp_ray.config import opt
from sepp_ray.errors import SeppError


@dataclass
class CurateConfig:
    pairs: str = opt("", "a pairs location (the output of `sepp mine`)")
    export: str | None = opt(
        None,
        "write the accepted pairs to this Parquet file (the `pairs.curated` input of "
        "`sepp pretrain`) and exit, without serving",
    )
    port: int = opt(8765, "port to serve the page on (0: any free port)")
    host: str = opt(
        "127.0.0.1",
        "address to listen on. On every address the page asks for a token: a random one, or "
        "$SEPP_CURATE_TOKEN (an environment variable, never a command-line argument, which "
        "`ps` shows); open the URL printed, which carries it once",
    )
    dataset: str | None = opt(None, "the image dataset (default: the one the pairs name)")
    decisions: str | None = opt(None, "where the decision log lives (default: PAIRS/curation)")
    out: str | None = opt(
        None, "where the page's Export button writes (default: DECISIONS/curated.parquet)"
    )
    user: str | None = opt(None, "who decides, recorded with each decision (default: login)")
    cache_mb: int = opt(512, "memory for images read ahead and kept (MiB, at least 16)")


def run_curate(c: CurateConfig) -> int:
    from sepp_ray.curate.server import serve, token_from_env
    from sepp_ray.curate.session import Curation

    if not c.pairs:
        raise SeppError("curate needs PAIRS, the output of `sepp mine` (see `sepp curate --help`)")
    token = token_from_env(dict(os.environ)) if c.export is None else ""
    cur = Curation(c.pairs, c.dataset, c.decisions, c.out, c.user, cache_mb=c.cache_mb)
    if c.export is not None:
        m = cur.export(c.export)
        counts = m["counts"]
        prec = ""
        if m["precision"] is not None:
            prec = f"; label precision {m['precision']:.3f}, mined {m['precision_mined']:.3f}"
        print(
            f"exported {counts['exported']} accepted pairs of {counts['pairs']} "
            f"({counts['rejected']} rejected, {counts['undecided']} undecided{prec}) to {m['out']}"
        )
        return 0
    serve(cur, c.host, c.port, token, announce=lambda s: print(s, flush=True))
    return 0
