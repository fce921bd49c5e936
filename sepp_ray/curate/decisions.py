"""The decision log: every accept, reject and undo, saved durably the moment it is made.

An append-only log of immutable segments, one per user action, under ``DECISIONS/``:
``<unix ns, 20 digits>-<random hex>.json``. A segment is written atomically (locally: a temp
file, fsynced, renamed, and the folder fsynced, so a decision acknowledged survives a power
loss; on S3 one PUT, which is atomic and durable when it returns, and objects cannot be
appended to), so a killed server leaves either the whole segment or none of it, two tabs (or
two servers) never write the same file, and replaying the segments in name order rebuilds the
state. A file system that lost power before the rename reached the disk may still show the
newest segments empty or cut short: such a trailing segment is moved aside with a warning
(``damaged-<name>``), since the action it held was never acknowledged as saved.

Records set states, never toggle them, so a replay is idempotent; each records the previous
states too, which makes undo a new record and survives restarts. When the log grows long,
opening writes one ``snapshot`` segment (newer than all it folds) and only then deletes the
folded ones: a crash in between replays to the same state; a snapshot keeps the names of
everyone who decided.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sepp_ray.curate.pairs import UNDECIDED, PairTable
from sepp_ray.errors import SeppError
from sepp_ray.storage import Location, is_remote

log = logging.getLogger(__name__)
SEGMENT = re.compile(r"^\d{20}-[0-9a-f]{12}\.json$")
COMPACT_AFTER = 500  # segments; listing and reading many small objects is slow on S3


@dataclass
class Batch:
    """One user action: the rows it changed, their new and previous states."""

    name: str
    rows: np.ndarray
    new: np.ndarray
    prev: np.ndarray


@dataclass
class DecisionState:
    """Current state of every pair, and the actions undo can still revert (newest last)."""

    codes: np.ndarray
    stack: list[Batch] = field(default_factory=list)
    deciders: set[str] = field(default_factory=set)


class DecisionLog:
    """Segments under ``uri``; ``open`` replays them, ``record`` adds one."""

    def __init__(self, uri: str, table: PairTable) -> None:
        self.uri = uri
        self.loc = Location(uri)
        self.table = table
        self._last_ns = 0
        self._lock = threading.Lock()

    def _name(self) -> str:
        with self._lock:
            ns = max(time.time_ns(), self._last_ns + 1)
            self._last_ns = ns
        return f"{ns:020d}-{os.urandom(6).hex()}.json"

    def segments(self) -> list[str]:
        return [n for n in self.loc.listdir() if SEGMENT.match(n)]

    def _parse(self, name: str) -> dict[str, Any] | None:
        """The record of one segment; None when it is empty, cut short or not a record."""
        try:
            rec = json.loads(self.loc.read_bytes(name))
        except ValueError:
            return None
        if not isinstance(rec, dict) or rec.get("op") not in ("decide", "undo", "snapshot"):
            return None
        return rec

    def _records(self, names: list[str]) -> list[tuple[str, dict[str, Any]]]:
        """Parsed segments in name order. Damaged ones at the end (what a power loss leaves)
        are moved aside; one followed by good segments is no crash of ours, and stops."""
        recs = [(n, self._parse(n)) for n in names]
        while recs and recs[-1][1] is None:
            self._set_aside(recs.pop()[0])
        for name, rec in recs:
            if rec is None:
                raise SeppError(
                    f"{self.uri}/{name} is not a decision record and newer segments follow it; "
                    "sepp writes none like it: move it out of the decisions folder"
                )
        return [(n, r) for n, r in recs if r is not None]

    def _set_aside(self, name: str) -> None:
        aside = f"damaged-{name}"
        self.loc.fs.mv(self.loc.join(name), self.loc.join(aside))
        log.warning(
            "%s/%s was empty or cut short (a power loss while it was written?): moved aside to "
            "%s; the action it held was never saved",
            self.uri,
            name,
            aside,
        )

    def write(self, rec: dict[str, Any]) -> str:
        """Write one segment atomically and durably; returns its name."""
        name = self._name()
        data = json.dumps(rec, separators=(",", ":")).encode()
        if is_remote(self.uri):
            self.loc.write_bytes(name, data)  # one PUT: atomic, and durable once it returns
        else:
            _write_durable(self.loc.join(name), data)
        return name

    def replay(self) -> DecisionState:
        """Rebuild the state from the segments, in name order; compact a long log."""
        state = DecisionState(np.zeros(len(self.table), np.int8))
        names = self.segments()
        unknown = 0
        for name, rec in self._records(names):
            rows = self.table.find(
                np.asarray(rec.get("anchor", []), np.int64),
                np.asarray(rec.get("positive", []), np.int64),
            )
            ok = rows >= 0
            unknown += int((~ok).sum())
            new = np.asarray(rec.get("new", []), np.int8)[ok]
            rows = rows[ok]
            if rec.get("who"):
                state.deciders.add(str(rec["who"]))
            state.deciders.update(str(w) for w in rec.get("deciders", ()))
            if rec["op"] == "snapshot":
                state.codes[:] = UNDECIDED
                state.stack.clear()
            state.codes[rows] = new
            if rec["op"] == "decide":
                prev = np.asarray(rec.get("prev", []), np.int8)[ok]
                state.stack.append(Batch(name, rows, new, prev))
            elif rec["op"] == "undo":
                state.stack = [b for b in state.stack if b.name != rec.get("undo_of")]
        if unknown:
            log.warning(
                "%d logged decisions name pairs that %s does not hold (re-mined?): ignored",
                unknown,
                self.uri,
            )
        names = self.segments()  # without any set aside
        if len(names) > COMPACT_AFTER:
            self._compact(state, names)
        return state

    def _compact(self, state: DecisionState, names: list[str]) -> None:
        rows = np.flatnonzero(state.codes != UNDECIDED)
        rec = self._record("snapshot", rows, state.codes[rows], None, who="")
        rec["deciders"] = sorted(state.deciders)  # the folded segments named them
        self.write(rec)  # newer than every folded segment: a crash after this is harmless
        for name in names:
            self.loc.fs.rm(self.loc.join(name))
        state.stack.clear()
        log.info("folded %d decision segments into one snapshot", len(names))

    def _record(
        self,
        op: str,
        rows: np.ndarray,
        new: np.ndarray,
        prev: np.ndarray | None,
        who: str,
        undo_of: str | None = None,
    ) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "op": op,
            "t": round(time.time(), 3),
            "who": who,
            "anchor": self.table.anchor[rows].tolist(),
            "positive": self.table.positive[rows].tolist(),
            "new": np.asarray(new).astype(int).tolist(),
        }
        if prev is not None:
            rec["prev"] = np.asarray(prev).astype(int).tolist()
        if undo_of:
            rec["undo_of"] = undo_of
        return rec

    def decide(self, state: DecisionState, rows: np.ndarray, code: int, who: str) -> int:
        """Set ``rows`` to ``code``: logged first, applied after; returns how many changed."""
        rows = np.unique(np.asarray(rows, np.int64))
        rows = rows[state.codes[rows] != code]
        if not len(rows):
            return 0
        new = np.full(len(rows), code, np.int8)
        prev = state.codes[rows].copy()
        name = self.write(self._record("decide", rows, new, prev, who))
        state.codes[rows] = new
        state.stack.append(Batch(name, rows, new, prev))
        if who:
            state.deciders.add(who)
        return len(rows)

    def undo(self, state: DecisionState, who: str) -> int:
        """Revert the newest action not yet undone; returns how many pairs changed back."""
        if not state.stack:
            return 0
        b = state.stack[-1]
        self.write(self._record("undo", b.rows, b.prev, b.new, who, undo_of=b.name))
        state.codes[b.rows] = b.prev
        state.stack.pop()
        return len(b.rows)


def _write_durable(path: str, data: bytes) -> None:
    """Temp file, fsync, rename, fsync of the folder: after a power loss the file is either
    absent or whole, and present once this returns."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.urandom(6).hex()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
