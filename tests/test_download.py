"""download_dataset against a real HTTP server on 127.0.0.1 serving tarballs in the official
layout (no network: the official URLs are never contacted)."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sepp_ray.data.download import DATASETS, MARKER, download_dataset
from sepp_ray.data.sources.base import RawItem, Source
from sepp_ray.data.sources.cifar import Cifar10Source
from sepp_ray.data.sources.stl10 import Stl10Source
from sepp_ray.errors import SeppError
from tests.formats import make_tarball, write_cifar10, write_stl10


class Server:
    """A static file server on an ephemeral port that counts the requests it answers."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.requests: list[str] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(
            ("127.0.0.1", 0), partial(Handler, directory=str(directory))
        )
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    (tmp_path / "www").mkdir()
    s = Server(tmp_path / "www")
    yield s
    s.close()


def read_all(source: Source) -> list[RawItem]:
    return [item for unit in source.units() for item in source.read_unit(unit)]


def files_under(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")) if path.exists() else []


def test_official_archives_are_the_torchvision_ones() -> None:
    """The URLs and md5s users download from are the ones torchvision checks."""
    from torchvision.datasets import CIFAR10, CIFAR100, STL10

    for name, ref in (("cifar10", CIFAR10), ("cifar100", CIFAR100), ("stl10", STL10)):
        spec = DATASETS[name]
        assert (spec.url, spec.md5, spec.folder) == (ref.url, ref.tgz_md5, ref.base_folder)
        assert spec.filename == ref.filename


def test_download_extract_and_skip(tmp_path: Path, server: Server) -> None:
    written = write_cifar10(tmp_path / "src", 3, 2, seed=0)
    md5 = make_tarball(written["dir"], server.directory / "cifar-10-python.tar.gz")
    root = tmp_path / "data"
    url = server.url("cifar-10-python.tar.gz")

    out = download_dataset("cifar10", str(root), url=url, md5=md5, progress=False)
    assert out == str(root / "cifar-10-batches-py")
    assert len(server.requests) == 1
    batch_files = ["batches.meta", "test_batch", *(f"data_batch_{i}" for i in range(1, 6))]
    # the archive is deleted after extraction
    expected = [
        "cifar-10-batches-py",
        *(f"cifar-10-batches-py/{n}" for n in [MARKER, *batch_files]),
    ]
    assert files_under(root) == sorted(expected)
    items = read_all(Cifar10Source(out))
    np.testing.assert_array_equal(items[0].payload, written["batches"]["data_batch_1"]["images"][0])
    assert len(items) == 17

    assert download_dataset("cifar10", root, url=url, md5=md5, progress=False) == out
    assert len(server.requests) == 1  # verified marker: no second download

    (Path(out) / "test_batch").unlink()  # damaged since: downloaded and extracted again
    assert download_dataset("cifar10", root, url=url, md5=md5, progress=True) == out
    assert len(server.requests) == 2 and (Path(out) / "test_batch").is_file()


def test_archive_already_in_root_is_used(tmp_path: Path, server: Server) -> None:
    written = write_stl10(tmp_path / "src", 2, 1, 1, seed=1)
    root = tmp_path / "data"
    root.mkdir()
    md5 = make_tarball(written["dir"], root / "stl10_binary.tar.gz")
    out = download_dataset("stl10", root, url=server.url("missing"), md5=md5, progress=False)
    assert server.requests == [] and (root / "stl10_binary.tar.gz").is_file()
    assert len(read_all(Stl10Source(out))) == 4


def test_md5_mismatch_leaves_nothing(tmp_path: Path, server: Server) -> None:
    written = write_cifar10(tmp_path / "src", 1, 1, seed=2)
    make_tarball(written["dir"], server.directory / "c.tar.gz")
    root = tmp_path / "data"
    with pytest.raises(SeppError, match="md5"):
        download_dataset("cifar10", root, url=server.url("c.tar.gz"), md5="0" * 32, progress=False)
    assert files_under(root) == []
    with pytest.raises(SeppError, match="could not download"):
        download_dataset("cifar10", root, url=server.url("absent.tar.gz"), progress=False)
    assert files_under(root) == []
    with pytest.raises(SeppError, match="unknown dataset"):
        download_dataset("imagenet", root)
    with pytest.raises(SeppError, match="local folder"):
        download_dataset("cifar10", "s3://bucket/data")


def test_wrong_or_unsafe_archive(tmp_path: Path, server: Server) -> None:
    """An archive without the dataset folder, or with a member escaping the target, is refused
    and nothing is extracted."""
    written = write_stl10(tmp_path / "src", 1, 1, 1, seed=3)
    md5 = make_tarball(written["dir"], server.directory / "stl.tar.gz")
    root = tmp_path / "data"
    with pytest.raises(SeppError, match="cifar-10-batches-py"):
        download_dataset("cifar10", root, url=server.url("stl.tar.gz"), md5=md5, progress=False)
    assert files_under(root) == []

    buf = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    (server.directory / "evil.tar.gz").write_bytes(buf.getvalue())
    md5 = hashlib.md5(buf.getvalue()).hexdigest()
    with pytest.raises(SeppError, match="escaped|unsafe|outside"):
        download_dataset("cifar10", root, url=server.url("evil.tar.gz"), md5=md5, progress=False)
    assert not (tmp_path / "escaped.txt").exists() and files_under(root) == []
