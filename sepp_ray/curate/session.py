"""One curation session: the pairs, their images, the decision log, behind one lock.

The web server is a thin layer over this class (tests call it directly too). Every change is
written to the log before it is applied, under the lock, so concurrent requests from several
tabs are serialised and a failed write changes nothing.
"""

from __future__ import annotations

import getpass
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from sepp_ray.curate.decisions import DecisionLog
from sepp_ray.curate.export import export_curated
from sepp_ray.curate.images import ImageStore
from sepp_ray.curate.pairs import DECISIONS, PairTable, Query, parse_id
from sepp_ray.errors import SeppError
from sepp_ray.mining.tables import read_pairs
from sepp_ray.storage import absolute, read_manifest

DECISIONS_DIR = "curation"
EXPORT_NAME = "curated.parquet"
MAX_PAIRS_PER_REQUEST = 10_000
MIN_CACHE_MB = 16  # two pages of 96 images of up to 80 KB


class NotFound(SeppError):
    """A request names a pair or image the session does not hold (HTTP 404)."""


class Curation:
    def __init__(
        self,
        pairs_uri: str,
        dataset_uri: str | None = None,
        decisions_uri: str | None = None,
        export_uri: str | None = None,
        user: str | None = None,
        cache_mb: int = 512,
    ) -> None:
        self.pairs_uri = absolute(pairs_uri)
        manifest = read_manifest(self.pairs_uri)
        if manifest.get("kind") != "pairs":
            raise SeppError(
                f"{pairs_uri} is a {manifest.get('kind')!r} output, not mined pairs: "
                "give the output of `sepp mine`"
            )
        self.dataset_uri = dataset_uri or manifest["dataset"]["uri"]
        raw = read_pairs(self.pairs_uri, columns=["anchor_id", "positive_id", "similarity"])
        ids = np.concatenate([raw["anchor_id"].to_numpy(), raw["positive_id"].to_numpy()]).astype(
            np.int64
        )
        if cache_mb < MIN_CACHE_MB:
            raise SeppError(
                f"cache_mb={cache_mb} is too small: give at least {MIN_CACHE_MB} (MiB), enough "
                "for the images of two pages"
            )
        self.images = ImageStore(self.dataset_uri, ids, cache_bytes=cache_mb << 20)
        self.table = PairTable(
            raw,
            self.images.labels(raw["anchor_id"].to_numpy()),
            self.images.labels(raw["positive_id"].to_numpy()),
        )
        base = self.pairs_uri.rstrip("/")
        self.decisions_uri = decisions_uri or f"{base}/{DECISIONS_DIR}"
        self.export_uri = export_uri or f"{self.decisions_uri.rstrip('/')}/{EXPORT_NAME}"
        self.user = user or getpass.getuser()
        self.log = DecisionLog(self.decisions_uri, self.table)
        self.state = self.log.replay()
        self.mined = {"lo": manifest.get("lo"), "hi": manifest.get("hi")}
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        sim = self.table.similarity
        return {
            "pairs": self.pairs_uri,
            "dataset": self.dataset_uri,
            "decisions": self.decisions_uri,
            "export": self.export_uri,
            "user": self.user,
            "classes": self.images.classes,
            "has_labels": self.images.has_labels,
            "similarity": {
                "min": float(sim.min()) if len(sim) else None,
                "max": float(sim.max()) if len(sim) else None,
                **self.mined,
            },
        }

    def page(self, q: Query) -> dict[str, Any]:
        with self._lock:
            codes = self.state.codes.copy()
            undo = len(self.state.stack)
        rows = self.table.matching(q, codes)
        start = q.page * q.per_page
        self._read_ahead(
            rows[start : start + q.per_page], rows[start + q.per_page : start + 2 * q.per_page]
        )
        return {
            "total": int(len(rows)),
            "page": q.page,
            "per_page": q.per_page,
            "pages": max(1, -(-len(rows) // q.per_page)),
            "pairs": self.table.rows_json(
                rows[start : start + q.per_page], codes, self.images.classes
            ),
            "progress": {**self.table.progress(codes), "can_undo": undo > 0},
        }

    def _read_ahead(self, rows: np.ndarray, next_rows: np.ndarray) -> None:
        """Start reading the images of this page's ``rows`` and of the next page's, so the
        browser's requests find them read or on their way."""

        def ids(r: np.ndarray) -> np.ndarray:  # anchor and positive, in page order
            return np.stack([self.table.anchor[r], self.table.positive[r]], axis=1).ravel()

        self.images.prefetch(ids(rows), ahead=ids(next_rows))

    def progress(self) -> dict[str, Any]:
        with self._lock:
            return {**self.table.progress(self.state.codes), "can_undo": bool(self.state.stack)}

    @staticmethod
    def _code(decision: Any) -> int:
        if decision not in DECISIONS:
            raise SeppError(f"decision must be one of {', '.join(DECISIONS)}; got {decision!r}")
        return DECISIONS[decision]

    def decide(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """``{"decision": "accept", "pairs": [[anchor, positive], ...]}``; all pairs must be
        known, or nothing changes."""
        code = self._code(body.get("decision"))
        pairs = body.get("pairs")
        if not isinstance(pairs, list) or not pairs:
            raise SeppError('"pairs" must be a non-empty list of [anchor, positive] id pairs')
        if len(pairs) > MAX_PAIRS_PER_REQUEST:
            raise SeppError(
                f"at most {MAX_PAIRS_PER_REQUEST} pairs a request: decide a band with "
                "/api/decide-matching instead"
            )
        if not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise SeppError('each of "pairs" must be [anchor, positive]')
        a = np.array([parse_id(p[0], "anchor") for p in pairs], np.int64)
        b = np.array([parse_id(p[1], "positive") for p in pairs], np.int64)
        rows = self.table.find(a, b)
        if (rows < 0).any():
            i = int(np.flatnonzero(rows < 0)[0])
            raise NotFound(f"no mined pair ({a[i]}, {b[i]}) in {self.pairs_uri}; nothing changed")
        with self._lock:
            changed = self.log.decide(self.state, rows, code, self.user)
        return {"changed": changed, **self.progress()}

    def decide_matching(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """``{"decision": "reject", "filter": {"lo": "0.96", "hi": "0.97", ...}}``: every pair
        matching the filter (a similarity band, say) gets one decision."""
        code = self._code(body.get("decision"))
        filt = body.get("filter", {})
        if not isinstance(filt, dict):
            raise SeppError('"filter" must be an object of query fields (lo, hi, agree, ...)')
        q = Query.parse(filt)
        with self._lock:
            rows = self.table.matching(q, self.state.codes)
            changed = self.log.decide(self.state, rows, code, self.user)
        return {"changed": changed, **self.progress()}

    def undo(self) -> dict[str, Any]:
        with self._lock:
            changed = self.log.undo(self.state, self.user)
        return {"changed": changed, **self.progress()}

    def image(self, image_id: Any) -> bytes:
        n = parse_id(image_id)
        try:
            return self.images.image(n)
        except KeyError:
            raise NotFound(f"image {n} is in none of the pairs") from None

    def export(self, out: str | None = None) -> dict[str, Any]:
        with self._lock:
            codes = self.state.codes.copy()
            deciders = set(self.state.deciders)
        source = {
            "source_pairs": self.pairs_uri,
            "dataset": self.dataset_uri,
            "decisions": self.decisions_uri,
        }
        m = export_curated(self.table, codes, out or self.export_uri, source, deciders, self.user)
        return {"out": out or self.export_uri, **m}
