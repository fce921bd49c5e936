"""`sepp curate` without a browser: the decision log, the HTTP API's refusals, export, S3."""

from __future__ import annotations

import io
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sepp_ray.curate import decisions as decisions_mod
from sepp_ray.curate.command import CurateConfig, run_curate
from sepp_ray.curate.export import read_curated_manifest
from sepp_ray.curate.pairs import ACCEPTED, REJECTED, UNDECIDED
from sepp_ray.curate.server import bind, create_app
from sepp_ray.curate.session import Curation
from sepp_ray.data.schema import IMAGE_SCHEMA
from sepp_ray.errors import SeppError
from sepp_ray.storage import begin_write, finish_write

CLASSES = ["red", "green", "blue", "grey"]
COLOURS = [(220, 40, 40), (40, 180, 60), (50, 80, 220), (128, 128, 128)]


def make_mined(root: Path, n_images: int = 40, n_pairs: int = 60, seed: int = 0) -> str:
    """A small ingested dataset (PNG shards, 4 labelled classes, several row groups) and a
    pairs location over it, shaped as `sepp ingest` and `sepp mine` write them. Ids exceed
    2**53, as the 63-bit hashes of real ids do."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(2**62, size=n_images, replace=False).astype(np.int64) + 2**60
    labels = np.arange(n_images) % len(CLASSES)
    blobs = []
    for i in range(n_images):
        base = np.array(COLOURS[labels[i]], np.int16)
        px = np.clip(base + rng.integers(-40, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, "PNG")
        blobs.append(buf.getvalue())
    ds = begin_write(str(root / "images"))
    table = pa.table(
        {
            "id": ids,
            "image": blobs,
            "label": labels.astype(np.int32),
            "split": ["train"] * n_images,
            "key": [f"img{i}.png" for i in range(n_images)],
        },
        schema=IMAGE_SCHEMA,
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=8)
    ds.write_bytes("shards/part-00000.parquet", buf.getvalue())
    finish_write(
        ds,
        {
            "kind": "images",
            "files": [{"path": "shards/part-00000.parquet", "rows": n_images}],
            "classes": CLASSES,
            "num_images": n_images,
            "splits": {"train": {"total": n_images}},
        },
    )
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < n_pairs:
        a, b = rng.choice(n_images, 2, replace=False)
        pairs.add((int(a), int(b)))
    pa_, pb = (np.array(x) for x in zip(*sorted(pairs), strict=True))
    loc = begin_write(str(root / "pairs"))
    t = pa.table(
        {
            "anchor_id": ids[pa_],
            "positive_id": ids[pb],
            "similarity": rng.uniform(0.9, 1.0, n_pairs).astype(np.float32),
            "rank": np.zeros(n_pairs, np.int32),
        }
    )
    buf = io.BytesIO()
    pq.write_table(t, buf)
    loc.write_bytes("pairs/part-00000.parquet", buf.getvalue())
    finish_write(
        loc,
        {
            "kind": "pairs",
            "dataset": {"uri": ds.uri, "classes": CLASSES},
            "files": {"pairs": "pairs/part-00000.parquet"},
            "lo": 0.9,
            "hi": 1.0,
            "num_pairs": n_pairs,
        },
    )
    return loc.uri


@pytest.fixture
def mined(tmp_path: Path) -> str:
    return make_mined(tmp_path)


def keys(cur: Curation, rows: list[int]) -> list[list[str]]:
    return [[str(cur.table.anchor[r]), str(cur.table.positive[r])] for r in rows]


def test_decisions_survive_reopen_and_undo_spans_restarts(mined: str) -> None:
    cur = Curation(mined)
    cur.decide({"decision": "accept", "pairs": keys(cur, [0, 1, 2])})
    cur.decide({"decision": "reject", "pairs": keys(cur, [2, 3])})
    cur.undo()  # row 2 back to accepted, row 3 undecided
    codes = cur.state.codes.copy()
    assert codes[:4].tolist() == [ACCEPTED, ACCEPTED, ACCEPTED, UNDECIDED]
    again = Curation(mined)
    assert (again.state.codes == codes).all()
    again.undo()  # the first action, logged before the restart
    assert (again.state.codes == UNDECIDED).all()
    assert (Curation(mined).state.codes == UNDECIDED).all()


def test_band_decision_and_filters(mined: str) -> None:
    cur = Curation(mined)
    r = cur.decide_matching({"decision": "reject", "filter": {"agree": "disagree"}})
    t = cur.table
    disagree = t.labeled & ~t.agree
    assert r["changed"] == int(disagree.sum()) > 0
    assert (cur.state.codes[disagree] == REJECTED).all()
    assert (cur.state.codes[~disagree] == UNDECIDED).all()
    from sepp_ray.curate.pairs import Query

    page = cur.page(Query.parse({"lo": "0.95", "decision": "undecided", "per_page": "5"}))
    assert all(p["similarity"] >= 0.95 and p["decision"] == "undecided" for p in page["pairs"])
    assert page["total"] == int(((t.similarity >= 0.95) & ~disagree).sum())
    assert [p["similarity"] for p in page["pairs"]] == sorted(
        (p["similarity"] for p in page["pairs"]), reverse=True
    )
    assert page["progress"]["rejected"] == r["changed"]


def test_concurrent_tabs_lose_nothing(mined: str) -> None:
    cur = Curation(mined)
    n = len(cur.table)

    def tab(rows: range, decision: str) -> None:
        for r in rows:
            cur.decide({"decision": decision, "pairs": keys(cur, [r])})

    threads = [
        threading.Thread(target=tab, args=(range(0, n, 2), "accept")),
        threading.Thread(target=tab, args=(range(1, n, 2), "reject")),
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    want = np.where(np.arange(n) % 2 == 0, ACCEPTED, REJECTED)
    assert (cur.state.codes == want).all()
    assert (Curation(mined).state.codes == want).all()
    assert len(cur.log.segments()) == n


def test_long_log_is_compacted_and_a_crash_mid_compaction_is_harmless(
    mined: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cur = Curation(mined)
    for r in range(12):
        cur.decide({"decision": "accept" if r % 3 else "reject", "pairs": keys(cur, [r])})
    want = cur.state.codes.copy()
    old = cur.log.segments()
    monkeypatch.setattr(decisions_mod, "COMPACT_AFTER", 5)
    # a crash after the snapshot, before the folded segments were deleted
    real_rm = cur.log.loc.fs.rm
    monkeypatch.setattr(type(cur.log.loc.fs), "rm", lambda *a, **k: None)
    assert (Curation(mined).state.codes == want).all()
    monkeypatch.setattr(type(cur.log.loc.fs), "rm", real_rm.__func__)  # type: ignore[attr-defined]
    compacted = Curation(mined)
    assert (compacted.state.codes == want).all()
    assert len(compacted.log.segments()) == 1 and not set(old) & set(compacted.log.segments())
    assert (Curation(mined).state.codes == want).all()


def test_export_is_the_curated_pairs_table(mined: str, tmp_path: Path) -> None:
    cur = Curation(mined, user="alice")
    t = cur.table
    good = np.flatnonzero(t.agree)[:5].tolist()
    bad = np.flatnonzero(t.labeled & ~t.agree)[:2].tolist()
    cur.decide({"decision": "accept", "pairs": keys(cur, good + bad)})
    cur.decide({"decision": "reject", "pairs": keys(cur, [r for r in range(len(t))][-1:])})
    out = str(tmp_path / "out" / "curated.parquet")
    m = cur.export(out)
    table = pq.read_table(out)
    assert table.column_names == ["image_a", "image_b", "similarity"]
    assert table.schema.field("image_a").type == pa.int64()
    assert sorted(table["image_a"].to_pylist()) == sorted(t.anchor[good + bad].tolist())
    got = read_curated_manifest(out)
    assert got["counts"]["exported"] == 7 == m["counts"]["accepted"]
    assert got["precision"] == round(5 / 7, 4)
    assert got["source_pairs"] == mined and got["decided_by"] == ["alice"]
    # the CLI's --export, from the same log
    assert run_curate(CurateConfig(pairs=mined, export=out)) == 0
    assert pq.read_table(out).num_rows == 7
    other = tmp_path / "notes.parquet"
    pq.write_table(pa.table({"x": [1]}), other)
    with pytest.raises(SeppError, match="not a curated pairs table"):
        cur.export(str(other))
    assert pq.read_table(other).column_names == ["x"]


def test_nothing_accepted_is_a_clear_error(mined: str, tmp_path: Path) -> None:
    with pytest.raises(SeppError, match="no pair is accepted"):
        run_curate(CurateConfig(pairs=mined, export=str(tmp_path / "c.parquet")))
    assert not (tmp_path / "c.parquet").exists()


def test_decision_log_on_object_storage(mined: str, bucket: str) -> None:
    uri = f"{bucket}/curation"
    cur = Curation(mined, decisions_uri=uri)
    cur.decide({"decision": "accept", "pairs": keys(cur, [0, 1])})
    cur.decide({"decision": "reject", "pairs": keys(cur, [1])})
    again = Curation(mined, decisions_uri=uri)
    assert again.state.codes[:3].tolist() == [ACCEPTED, REJECTED, UNDECIDED]
    assert len(again.log.segments()) == 2
    m = again.export(f"{bucket}/export/curated.parquet")
    assert m["counts"]["exported"] == 1
    assert read_curated_manifest(f"{bucket}/export/curated.parquet")["counts"]["rejected"] == 1


# --- the HTTP API --------------------------------------------------------------------------


@pytest.fixture
def served(mined: str) -> Iterator[tuple[str, Curation]]:
    import uvicorn

    cur = Curation(mined)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(cur, token="s3cret"), log_level="error"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    while not server.started:
        threading.Event().wait(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", cur
    server.should_exit = True
    th.join(10)


def call(
    url: str,
    body: Any = None,
    token: str | None = "s3cret",
    ctype: str = "application/json",
    host: str | None = None,
) -> tuple[int, bytes]:
    data = (
        None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    )
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", ctype)
    if token:
        req.add_header("X-Sepp-Token", token)
    if host:
        req.add_header("Host", host)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_bad_requests_get_4xx_and_change_nothing(served: tuple[str, Curation]) -> None:
    url, cur = served
    a, p = keys(cur, [0])[0]
    status, body = call(f"{url}/img/{a}")
    assert status == 200 and body.startswith(b"\x89PNG")
    assert call(f"{url}/api/pairs?per_page=3")[0] == 200
    bad: list[tuple[str, Any, int]] = [
        ("/img/123", None, 404),  # an id in no pair
        ("/img/abc", None, 400),
        ("/img/..%2F..%2Fmanifest.json", None, 404),
        ("/assets/..%2F..%2Fsession.py", None, 404),
        ("/assets/../session.py", None, 404),
        ("/assets/index.html%00.js", None, 404),
        ("/api/pairs?per_page=100000", None, 400),
        ("/api/pairs?lo=nan", None, 400),
        ("/api/pairs?sort=evil", None, 400),
        ("/api/decide", {"decision": "accept", "pairs": [[a, "12345"]]}, 404),
        ("/api/decide", {"decision": "accept", "pairs": [[a, p], [p, p]]}, 404),
        ("/api/decide", {"decision": "accept", "pairs": [[a, p], [p, a + "0"]]}, 400),
        ("/api/decide", {"decision": "maybe", "pairs": [[a, p]]}, 400),
        ("/api/decide", {"decision": "accept", "pairs": [[a]]}, 400),
        ("/api/decide", {"decision": "accept", "pairs": [[1.5, p]]}, 400),
        ("/api/decide", {"decision": "accept", "pairs": []}, 400),
        ("/api/decide", [1, 2], 400),
        ("/api/decide", b"{not json", 400),
        ("/api/decide-matching", {"decision": "accept", "filter": {"lo": "high"}}, 400),
        ("/api/decide-matching", {"decision": "accept", "filter": {"anchor": "1e5"}}, 400),
        ("/api/decide-matching", {"decision": "accept", "filter": []}, 400),
    ]
    for path, body, want in bad:
        status, text = call(url + path, body)
        assert status == want, (path, body, status, text)
        if path.startswith("/api/"):
            assert json.loads(text)["error"], path
    # a form post (the only cross-site write a browser sends without asking) is refused
    form = f"decision=accept&pairs={a}".encode()
    status, _ = call(f"{url}/api/decide", form, ctype="application/x-www-form-urlencoded")
    assert status == 400
    assert call(f"{url}/api/pairs", token=None)[0] == 401
    assert call(f"{url}/api/pairs", token="wrong")[0] == 401
    assert call(f"{url}/img/{a}", token=None)[0] == 401
    assert call(f"{url}/api/pairs", host="evil.example:80")[0] == 400  # DNS rebinding
    assert call(f"{url}/")[0] == 200  # the page itself holds no data
    assert (cur.state.codes == UNDECIDED).all()
    assert cur.log.segments() == []
    assert (Curation(cur.pairs_uri).state.codes == UNDECIDED).all()
    status, body = call(f"{url}/api/decide", {"decision": "accept", "pairs": [[a, p]]})
    assert status == 200 and json.loads(body)["accepted"] == 1


def test_off_loopback_needs_a_token(mined: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEPP_CURATE_TOKEN", raising=False)
    with pytest.raises(SeppError, match="give a token"):
        run_curate(CurateConfig(pairs=mined, host="0.0.0.0", port=0))
    from sepp_ray.cli import parse_config

    _, c = parse_config(["curate", mined, "--port", "0", "--host", "0.0.0.0", "--export", "x"])
    assert (c.port, c.host, c.export) == (0, "0.0.0.0", "x")
