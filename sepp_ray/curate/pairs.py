"""The mined pairs as the page sees them: filter, sort and page in a few milliseconds.

Columns stay NumPy arrays (100,000 pairs are a few MB); a query is a mask and a precomputed
order, so each page costs O(pairs) vector work and no Python loop over pairs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from sepp_ray.errors import SeppError

UNDECIDED, ACCEPTED, REJECTED = 0, 1, 2
DECISIONS = {"undecided": UNDECIDED, "accept": ACCEPTED, "reject": REJECTED}
STATE_NAMES = ("undecided", "accepted", "rejected")
AGREE = ("any", "agree", "disagree")
SORTS = ("similarity_desc", "similarity_asc", "anchor")
MAX_PER_PAGE = 500


def parse_id(value: Any, what: str = "image id") -> int:
    """An int64 image id from JSON: ids are sent as decimal strings (JavaScript numbers lose
    precision past 2**53, and ids are 63-bit hashes)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SeppError(f"{what} must be a decimal string, got {value!r}")
    text = str(value)
    if not text.lstrip("-").isdigit() or len(text) > 20:
        raise SeppError(f"{what} must be a decimal string, got {value!r}")
    n = int(text)
    if not -(2**63) <= n < 2**63:
        raise SeppError(f"{what} {value!r} is outside int64")
    return n


def _float(params: Mapping[str, Any], key: str) -> float | None:
    v = params.get(key)
    if v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise SeppError(f"{key} must be a number, got {v!r}") from None
    if not np.isfinite(x):
        raise SeppError(f"{key} must be a finite number, got {v!r}")
    return x


def _int(params: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    v = params.get(key)
    if v is None or v == "":
        return default
    try:
        x = int(str(v))
    except ValueError:
        raise SeppError(f"{key} must be an integer, got {v!r}") from None
    if not lo <= x <= hi:
        raise SeppError(f"{key} must be in [{lo}, {hi}], got {x}")
    return x


def _choice(params: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    v = params.get(key) or choices[0]
    if v not in choices:
        raise SeppError(f"{key} must be one of {', '.join(choices)}; got {v!r}")
    return str(v)


@dataclass(frozen=True)
class Query:
    """Which pairs the page shows: a similarity band, one anchor, label agreement, decision."""

    lo: float | None = None
    hi: float | None = None
    anchor: int | None = None
    agree: str = "any"
    decision: str = "any"
    sort: str = "similarity_desc"
    page: int = 0
    per_page: int = 48

    @classmethod
    def parse(cls, params: Mapping[str, Any]) -> Query:
        """From URL parameters or a JSON body; SeppError (a 400) on anything malformed."""
        anchor = params.get("anchor")
        return cls(
            lo=_float(params, "lo"),
            hi=_float(params, "hi"),
            anchor=None if anchor in (None, "") else parse_id(anchor, "anchor"),
            agree=_choice(params, "agree", AGREE),
            decision=_choice(params, "decision", ("any", *STATE_NAMES)),
            sort=_choice(params, "sort", SORTS),
            page=_int(params, "page", 0, 0, 10**9),
            per_page=_int(params, "per_page", 48, 1, MAX_PER_PAGE),
        )


class PairTable:
    """Mined pairs with the labels of both images (-1 where unknown)."""

    def __init__(self, table: pa.Table, label_a: np.ndarray, label_b: np.ndarray) -> None:
        self.anchor = table["anchor_id"].to_numpy().astype(np.int64)
        self.positive = table["positive_id"].to_numpy().astype(np.int64)
        self.similarity = table["similarity"].to_numpy().astype(np.float32)
        self.label_a = np.asarray(label_a, np.int64)
        self.label_b = np.asarray(label_b, np.int64)
        self.labeled = (self.label_a >= 0) & (self.label_b >= 0)
        self.agree = self.labeled & (self.label_a == self.label_b)
        # lookup by (anchor, positive): one int64 key per pair from the ranks of both ids
        self._ua = np.unique(self.anchor)
        self._up = np.unique(self.positive)
        keys = np.searchsorted(self._ua, self.anchor) * len(self._up) + np.searchsorted(
            self._up, self.positive
        )
        self._key_order = np.argsort(keys, kind="stable")
        self._keys = keys[self._key_order]
        if len(keys) > 1 and (self._keys[1:] == self._keys[:-1]).any():
            raise SeppError(
                "the pairs table lists a pair twice: it is not the output of `sepp mine`"
            )
        self._orders = {
            "similarity_desc": np.argsort(-self.similarity, kind="stable"),
            "similarity_asc": np.argsort(self.similarity, kind="stable"),
            "anchor": np.lexsort((-self.similarity, self.anchor)),
        }

    def __len__(self) -> int:
        return len(self.anchor)

    def find(self, anchors: np.ndarray, positives: np.ndarray) -> np.ndarray:
        """Rows of the pairs (anchor, positive); -1 where a pair is not in the table."""
        anchors = np.asarray(anchors, np.int64)
        positives = np.asarray(positives, np.int64)
        if not len(self):
            return np.full(len(anchors), -1, np.int64)
        ia = np.minimum(np.searchsorted(self._ua, anchors), len(self._ua) - 1)
        ip = np.minimum(np.searchsorted(self._up, positives), len(self._up) - 1)
        known = (self._ua[ia] == anchors) & (self._up[ip] == positives)
        pos = np.searchsorted(self._keys, ia * len(self._up) + ip)
        pos = np.minimum(pos, len(self._keys) - 1)
        known &= self._keys[pos] == ia * len(self._up) + ip
        return np.where(known, self._key_order[pos], -1)

    def matching(self, q: Query, codes: np.ndarray) -> np.ndarray:
        """Rows matching ``q``, in its sort order."""
        m = np.ones(len(self), bool)
        if q.lo is not None:
            m &= self.similarity >= np.float32(q.lo)
        if q.hi is not None:
            m &= self.similarity <= np.float32(q.hi)
        if q.anchor is not None:
            m &= self.anchor == q.anchor
        if q.agree == "agree":
            m &= self.agree
        elif q.agree == "disagree":
            m &= self.labeled & ~self.agree
        if q.decision != "any":
            m &= codes == STATE_NAMES.index(q.decision)
        order = self._orders[q.sort]
        return order[m[order]]

    def rows_json(self, rows: np.ndarray, codes: np.ndarray, classes: list[str]) -> list[dict]:
        def name(label: int) -> str | None:
            if label < 0:
                return None
            return classes[label] if label < len(classes) else str(label)

        return [
            {
                "anchor": str(self.anchor[r]),
                "positive": str(self.positive[r]),
                "similarity": round(float(self.similarity[r]), 5),
                "label_a": name(int(self.label_a[r])),
                "label_b": name(int(self.label_b[r])),
                "agree": bool(self.agree[r]) if self.labeled[r] else None,
                "decision": STATE_NAMES[int(codes[r])],
            }
            for r in rows.tolist()
        ]

    def progress(self, codes: np.ndarray) -> dict[str, Any]:
        """Counts per decision and, with labels, the precision of the accepted pairs."""
        acc = codes == ACCEPTED
        out: dict[str, Any] = {
            "total": len(self),
            "accepted": int(acc.sum()),
            "rejected": int((codes == REJECTED).sum()),
            "undecided": int((codes == UNDECIDED).sum()),
            "precision": None,
        }
        lab = acc & self.labeled
        if lab.any():
            out["precision"] = round(float((acc & self.agree).sum() / lab.sum()), 4)
        return out
