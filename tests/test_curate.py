"""`sepp curate` without a browser: the decision log, the HTTP API's refusals, export, S3."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import stat
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sepp_ray.curate import decisions as decisions_mod
from sepp_ray.curate.cache import ByteLRU
from sepp_ray.curate.command import CurateConfig, run_curate
from sepp_ray.curate.export import read_curated_manifest
from sepp_ray.curate.images import ImageStore
from sepp_ray.curate.pairs import ACCEPTED, REJECTED, UNDECIDED
from sepp_ray.curate.session import Curation
from sepp_ray.data.schema import IMAGE_SCHEMA
from sepp_ray.errors import SeppError
from sepp_ray.storage import begin_write, finish_write

CLASSES = ["red", "green", "blue", "grey"]
COLOURS = [(220, 40, 40), (40, 180, 60), (50, 80, 220), (128, 128, 128)]


def make_mined(
    root: Path | str,
    n_images: int = 40,
    n_pairs: int = 60,
    seed: int = 0,
    classes: list[str] | None = None,
) -> str:
    """A small ingested dataset (PNG shards, 4 labelled classes, several row groups) and a
    pairs location over it, shaped as `sepp ingest` and `sepp mine` write them. Ids exceed
    2**53, as the 63-bit hashes of real ids do."""
    classes = classes or CLASSES
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
    ds = begin_write(f"{root}/images")
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
            "classes": classes,
            "num_images": n_images,
            "splits": {"train": {"total": n_images}},
        },
    )
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < n_pairs:
        a, b = rng.choice(n_images, 2, replace=False)
        pairs.add((int(a), int(b)))
    pa_, pb = (np.array(x) for x in zip(*sorted(pairs), strict=True))
    loc = begin_write(f"{root}/pairs")
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
            "dataset": {"uri": ds.uri, "classes": classes},
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
    for r, who in enumerate(["alice"] * 6 + ["bob"] * 6):
        cur = Curation(mined, user=who)
        cur.decide({"decision": "accept" if r % 3 else "reject", "pairs": keys(cur, [r])})
    want = cur.state.codes.copy()
    old = cur.log.segments()
    monkeypatch.setattr(decisions_mod, "COMPACT_AFTER", 5)
    # a crash after the snapshot, before the folded segments were deleted
    real_rm = cur.log.loc.fs.rm
    monkeypatch.setattr(type(cur.log.loc.fs), "rm", lambda *a, **k: None)
    assert (Curation(mined).state.codes == want).all()
    monkeypatch.setattr(type(cur.log.loc.fs), "rm", real_rm.__func__)  # type: ignore[attr-defined]
    compacted = Curation(mined, user="carol")
    assert (compacted.state.codes == want).all()
    assert len(compacted.log.segments()) == 1 and not set(old) & set(compacted.log.segments())
    again = Curation(mined, user="carol")
    assert (again.state.codes == want).all()
    assert again.state.deciders == {"alice", "bob"}  # the folded segments' deciders survive
    assert read_curated_manifest(again.export()["out"])["decided_by"] == ["alice", "bob"]


def test_segments_and_their_folder_are_fsynced(mined: str, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[bool] = []  # one per fsync: was it a folder?
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    cur = Curation(mined)
    monkeypatch.setattr(decisions_mod.os, "fsync", spy)
    cur.decide({"decision": "accept", "pairs": keys(cur, [0])})
    assert synced == [False, True]  # the segment, then the folder that names it


def test_a_damaged_trailing_segment_is_set_aside(
    mined: str, caplog: pytest.LogCaptureFixture
) -> None:
    cur = Curation(mined)
    cur.decide({"decision": "accept", "pairs": keys(cur, [0, 1])})
    want = cur.state.codes.copy()
    folder = Path(cur.log.loc.path)
    # what a power loss can leave: the newest segments empty or cut short
    (folder / f"{9 * 10**19:020d}-{'a' * 12}.json").write_bytes(b"")
    (folder / f"{9 * 10**19 + 1:020d}-{'b' * 12}.json").write_bytes(b'{"op":"decide","anc')
    with caplog.at_level(logging.WARNING, logger=decisions_mod.__name__):
        again = Curation(mined)
    assert (again.state.codes == want).all()
    assert len(again.log.segments()) == 1
    assert sorted(p.name for p in folder.glob("damaged-*")) == [
        f"damaged-{9 * 10**19:020d}-{'a' * 12}.json",
        f"damaged-{9 * 10**19 + 1:020d}-{'b' * 12}.json",
    ]
    assert "cut short" in caplog.text
    again.decide({"decision": "reject", "pairs": keys(again, [2])})  # the log goes on
    assert Curation(mined).state.codes[:3].tolist() == [ACCEPTED, ACCEPTED, REJECTED]
    # a bad segment with good ones after it is no power loss: refused, left in place
    (folder / f"{10**9:020d}-{'c' * 12}.json").write_bytes(b"")
    with pytest.raises(SeppError, match="newer segments follow it"):
        Curation(mined)


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


def test_the_page_script_writes_no_html() -> None:
    """Data reaches the page as text only: no HTML-parsing sink in the script at all."""
    from importlib import resources

    js = (resources.files("sepp_ray.curate") / "assets" / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js, sink


def test_byte_lru_keeps_what_was_asked_for() -> None:
    c = ByteLRU(100)
    c.put(1, b"a" * 40)
    c.put(2, b"b" * 40)
    c.put(3, b"c" * 30, hot=False)  # no spare room: a speculative entry is dropped
    assert 3 not in c and c.bytes == 80
    c.put(4, b"d" * 20, hot=False)  # spare room: kept, at the cold end
    assert c.get(1) is not None  # 1 is now the hottest
    c.put(5, b"e" * 30)  # over budget: the speculative entry goes first, then the coldest
    assert 4 not in c and 2 not in c and 1 in c and 5 in c and c.bytes == 70


def test_images_read_each_row_group_once(mined: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cur = Curation(mined)
    store = cur.images
    reads: list[tuple[int, int]] = []
    real = ImageStore._read_group
    gate = threading.Event()

    def counted(self: ImageStore, key: tuple[int, int], read: Any) -> dict[int, bytes]:
        reads.append(key)
        gate.wait(10)  # hold the read until every request has asked
        return real(self, key, read)

    monkeypatch.setattr(ImageStore, "_read_group", counted)
    ids = np.unique(np.concatenate([cur.table.anchor, cur.table.positive]))
    members = ids[(store._file[store._rows(ids)] == 0) & (store._group[store._rows(ids)] == 0)]
    assert len(members) >= 3
    with ThreadPoolExecutor(len(members)) as pool:
        got = [pool.submit(store.image, int(i)) for i in members]
        while len(store._reads) < 1 or len(reads) < 1:
            time.sleep(0.01)
        time.sleep(0.2)
        gate.set()
        blobs = [f.result(10) for f in got]
    assert reads == [(0, 0)]  # many requests, one read
    want = pq.read_table(Path(mined).parent / "images" / "shards" / "part-00000.parquet")
    by_id = dict(zip(want["id"].to_pylist(), want["image"].to_pylist(), strict=True))
    assert blobs == [by_id[int(i)] for i in members]


def test_a_page_reads_its_images_ahead(mined: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from sepp_ray.curate.pairs import Query

    cur = Curation(mined)
    reads: list[tuple[int, int]] = []
    real = ImageStore._read_group

    def counted(self: ImageStore, key: tuple[int, int], read: Any) -> dict[int, bytes]:
        reads.append(key)
        return real(self, key, read)

    monkeypatch.setattr(ImageStore, "_read_group", counted)
    page = cur.page(Query(per_page=5))
    ids = [int(p[k]) for p in page["pairs"] for k in ("anchor", "positive")]
    deadline = time.time() + 10
    while cur.images._reads and time.time() < deadline:
        time.sleep(0.01)
    ahead = len(reads)
    rows = cur.images._rows(np.array(ids))
    f, g = cur.images._file[rows].tolist(), cur.images._group[rows].tolist()
    groups = set(zip(f, g, strict=True))
    assert len(set(reads)) == ahead and groups <= set(reads)  # each group once, page's first
    for i in ids:
        cur.image(i)
    assert len(reads) == ahead  # the browser's requests read nothing more
    assert cur.images.cached_bytes > 0


def test_an_image_on_s3_reads_its_row_group_alone(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    cur = Curation(make_mined(bucket))
    store = cur.images
    fetched: list[int] = []
    real = s3fs.core.S3File._fetch_range

    def counted(self: Any, start: int, end: int) -> bytes:
        data: bytes = real(self, start, end)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counted)
    image_id = int(cur.table.anchor[0])
    row = store._rows(np.array([image_id]))[0]
    meta = store._meta[int(store._file[row])].row_group(int(store._group[row]))
    chunk = next(
        meta.column(c).total_compressed_size
        for c in range(meta.num_columns)
        if meta.column(c).path_in_schema == "image"
    )
    blob = cur.image(image_id)
    assert blob.startswith(b"\x89PNG")
    assert sum(fetched) == chunk  # that one column chunk, no read-ahead past it


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

    # here, not at the top: the GPU image lacks starlette, and its `pytest -m gpu` collects this
    from sepp_ray.curate.server import bind, create_app

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
    assert (cur.state.codes == UNDECIDED).all()
    assert cur.log.segments() == []
    assert (Curation(cur.pairs_uri).state.codes == UNDECIDED).all()
    status, body = call(f"{url}/api/decide", {"decision": "accept", "pairs": [[a, p]]})
    assert status == 200 and json.loads(body)["accepted"] == 1


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def fetch(url: str, cookie: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET without following redirects: status, headers, body."""
    req = urllib.request.Request(url)
    if cookie:
        req.add_header("Cookie", cookie)
    try:
        with urllib.request.build_opener(NoRedirect).open(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_the_token_is_traded_once_for_a_strict_cookie(served: tuple[str, Curation]) -> None:
    url, cur = served
    a = keys(cur, [0])[0][0]
    for path in ("/", "/assets/app.js", "/api/info", f"/img/{a}"):
        assert fetch(url + path)[0] == 401, path  # nothing without the token
    status, headers, _ = fetch(f"{url}/?token=s3cret&lo=0.95")
    assert status == 303 and headers["location"] == "/?lo=0.95"  # the clean URL
    cookie = headers["set-cookie"]
    assert cookie.startswith("sepp-curate=s3cret;")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    jar = "sepp-curate=s3cret"
    for path in ("/", "/assets/app.js", "/api/info", f"/img/{a}"):
        assert fetch(url + path, cookie=jar)[0] == 200, path
    page, headers, _ = fetch(f"{url}/", cookie=jar)
    assert "script-src" not in headers["content-security-policy"]  # default-src 'self' rules
    assert "default-src 'self'" in headers["content-security-policy"]
    assert fetch(f"{url}/?token=wrong")[0] == 401
    assert "set-cookie" not in fetch(f"{url}/?token=wrong")[1]
    assert fetch(url + "/api/info", cookie="sepp-curate=wrong")[0] == 401
    # the token travels in a URL once, to the page: never to the API or the images
    assert fetch(f"{url}/api/info?token=s3cret")[0] == 401
    assert fetch(f"{url}/img/{a}?token=s3cret")[0] == 401


def test_the_token_is_random_and_never_on_the_command_line(
    mined: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sepp_ray.cli import parse_config
    from sepp_ray.curate.server import TOKEN_ENV, same_token, token_from_env

    one, two = token_from_env({}), token_from_env({})
    assert one != two and len(one) >= 40
    assert token_from_env({TOKEN_ENV: "x" * 20}) == "x" * 20
    with pytest.raises(SeppError, match="at least 16"):
        token_from_env({TOKEN_ENV: "short"})
    assert same_token(one, one) and not same_token(one, two) and not same_token("", one)
    with pytest.raises(SystemExit):
        parse_config(["curate", mined, "--token", "x" * 20])
    with pytest.raises(SeppError, match="token"):
        parse_config(["curate", mined, f"token={'x' * 20}"])
    _, c = parse_config(["curate", mined, "--port", "0", "--host", "0.0.0.0", "--export", "x"])
    assert (c.port, c.host, c.export) == (0, "0.0.0.0", "x")
    # any address serves, the token guarding it; a short one from the environment is refused
    monkeypatch.setenv(TOKEN_ENV, "short")
    with pytest.raises(SeppError, match="at least 16"):
        run_curate(CurateConfig(pairs=mined, host="0.0.0.0", port=0))


def raw_request(url: str, head: str, body: bytes = b"") -> tuple[int, float]:
    """Send a hand-made request; the status and the seconds until the server answered."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        t0 = time.perf_counter()
        s.sendall(head.encode() + b"\r\n" + body)
        status = int(s.recv(4096).split(b" ", 2)[1])
        return status, time.perf_counter() - t0


def test_the_body_size_is_checked_before_reading(served: tuple[str, Curation]) -> None:
    url, cur = served
    head = (
        "POST /api/decide HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Sepp-Token: s3cret\r\n"
        "Content-Type: application/json\r\n"
    )
    # 3 MB announced, none sent: answered at once, so the body was never waited for
    status, seconds = raw_request(url, head + "Content-Length: 3000000\r\n")
    assert status == 413 and seconds < 5
    assert (
        raw_request(url, head + "Transfer-Encoding: chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n")[0] == 411
    )
    a, p = keys(cur, [0])[0]
    body = json.dumps({"decision": "accept", "pairs": [[a, p]]}).encode()
    ok = raw_request(url, head + f"Content-Length: {len(body)}\r\nConnection: close\r\n", body)
    assert ok[0] == 200 and cur.state.codes[0] == ACCEPTED


def test_clearing_a_pairs_location_keeps_its_session(
    mined: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The step of `sepp mine overwrite=true` that clears the old output (in seconds; the
    whole command is the slow test below)."""
    from sepp_ray.mining.command import _begin_keeping_curation

    cur = Curation(mined, user="alice")
    cur.decide({"decision": "accept", "pairs": keys(cur, [0, 1])})
    cur.export()
    folder = Path(cur.log.loc.path)
    before = sorted(p.name for p in folder.iterdir())
    loc = _begin_keeping_curation(mined, overwrite=True)
    assert "kept the curation session" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == before
    assert not (Path(loc.path) / "pairs").exists()  # the old pairs themselves are gone


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_a_re_mine_keeps_the_curation_session(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sepp_ray.curate.session import DECISIONS_DIR
    from sepp_ray.data.ingest import ingest
    from sepp_ray.data.sources import SourceOptions, open_source
    from sepp_ray.mining.command import CURATION_DIR, mine_command
    from sepp_ray.mining.encoder import EncoderConfig
    from sepp_ray.mining.mine import MineConfig

    assert DECISIONS_DIR == CURATION_DIR  # mining keeps the folder curation writes
    images = str(tmp_path / "syn")
    ingest(open_source("synthetic", options=SourceOptions(n=64, size=16, chunk_size=32)), images)
    pairs = str(tmp_path / "pairs")

    def mine(m: int, overwrite: bool) -> None:
        mine_command(
            images,
            pairs,
            EncoderConfig(name="resnet18", cifar_stem=True, image_size=16),
            MineConfig(lo=-1.0, hi=0.9999, k=16, m=m),
            splits=["train"],
            actors=None,
            overwrite=overwrite,
            config={},
        )

    mine(1, overwrite=False)
    cur = Curation(pairs, user="alice")
    decided = keys(cur, list(range(len(cur.table))))
    cur.decide({"decision": "accept", "pairs": decided})
    cur.export()
    session = sorted(p.name for p in (tmp_path / "pairs" / "curation").iterdir())
    mine(2, overwrite=True)  # more positives per anchor: every earlier pair is mined again
    assert "kept the curation session" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "pairs" / "curation").iterdir()) == session
    again = Curation(pairs)
    assert len(again.table) > len(decided)
    rows = again.table.find(*(np.array([int(k[i]) for k in decided]) for i in (0, 1)))
    assert (rows >= 0).all() and (again.state.codes[rows] == ACCEPTED).all()
    assert int((again.state.codes == ACCEPTED).sum()) == len(decided)
    assert read_curated_manifest(again.export_uri)["decided_by"] == ["alice"]
