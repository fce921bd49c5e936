"""Download and extract the public benchmark datasets (CIFAR-10, CIFAR-100, STL-10).

Used by people, not by the pipeline: ingest never touches the network. The archive is streamed
to a temp file with its md5 checked on the fly, extracted with tarfile's "data" filter (no
absolute paths, no ``..``, no links out of the folder) into a temp folder and moved into place;
a marker written last (``.sepp-download.json``: archive md5 and the size of every file) makes
a second call a no-op, and a half-extracted folder from a crash is redone, not trusted.

Also home of the small file helpers the binary sources share (archive refusal, file digests).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsspec import AbstractFileSystem
from tqdm import tqdm

from sepp_ray.errors import SeppError

MARKER = ".sepp-download.json"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
_MIB = 1 << 20


@dataclass(frozen=True)
class DatasetArchive:
    url: str
    md5: str  # of the archive; the values torchvision checks
    folder: str  # the single top-level folder inside the archive

    @property
    def filename(self) -> str:
        return posixpath.basename(self.url)


DATASETS: dict[str, DatasetArchive] = {
    "cifar10": DatasetArchive(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
    ),
    "cifar100": DatasetArchive(
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
    ),
    "stl10": DatasetArchive(
        "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
        "91f7769df0f17e558f3565bffb0c7dfb",
        "stl10_binary",
    ),
}


def download_dataset(
    name: str,
    root: str | os.PathLike[str],
    *,
    url: str | None = None,
    md5: str | None = None,
    progress: bool = True,
    keep_archive: bool = False,
) -> str:
    """Download and extract dataset ``name`` under the local folder ``root``.

    Returns the extracted dataset folder (``root/cifar-10-batches-py`` ...), which is what the
    matching source reads. ``url`` overrides the official address (a mirror); ``md5`` the
    expected archive checksum (default: the official one). An archive already in ``root`` with
    the right md5 is used without downloading; a downloaded archive is deleted after extraction
    unless ``keep_archive``.
    """
    spec = DATASETS.get(name)
    if spec is None:
        raise SeppError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    root_s = os.fspath(root)
    if "://" in root_s and not root_s.startswith("file://"):
        raise SeppError(
            f"download root {root_s!r} is not a local folder: download to a local folder, then "
            "copy the extracted folder to object storage (or ingest from the local copy)"
        )
    base = Path(root_s.removeprefix("file://")).expanduser().absolute()
    want_md5 = (md5 or spec.md5).lower()
    target = base / spec.folder
    if _is_complete(target, want_md5):
        return str(target)

    created_root = not base.exists()
    base.mkdir(parents=True, exist_ok=True)
    archive = base / spec.filename
    downloaded = False
    try:
        if not (archive.is_file() and file_md5(archive) == want_md5):
            _fetch(url or spec.url, archive, want_md5, progress)
            downloaded = True
        _extract(archive, base, spec.folder)
        _write_marker(target, name, want_md5)
    except BaseException:
        if downloaded:
            archive.unlink(missing_ok=True)
        if created_root and not any(base.iterdir()):
            base.rmdir()
        raise
    if downloaded and not keep_archive:
        archive.unlink()
    return str(target)


def file_md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(_MIB):
            h.update(block)
    return h.hexdigest()


def _fetch(url: str, dest: Path, md5: str, progress: bool) -> None:
    """Stream ``url`` into ``dest`` through a temp file; only a verified file gets its name."""
    part = dest.with_name(dest.name + ".part")
    h = hashlib.md5(usedforsecurity=False)
    request = urllib.request.Request(url, headers={"User-Agent": "sepp-ray"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp, open(part, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name,
                disable=not progress,
            ) as bar:
                while block := resp.read(_MIB):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        raise SeppError(
            f"could not download {url}: {e}. Check the network or pass url= a mirror; or "
            f"download the file by hand to {dest} and call again"
        ) from e
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if h.hexdigest() != md5:
        part.unlink()
        raise SeppError(
            f"{url} has md5 {h.hexdigest()}, expected {md5}: the download is corrupt or not the "
            "right file; deleted it. Try again, or pass the right url=/md5="
        )
    os.replace(part, dest)


def _extract(archive: Path, base: Path, folder: str) -> None:
    """Extract into a temp folder beside the target, then move the dataset folder into place."""
    tmp = Path(tempfile.mkdtemp(prefix=".sepp-extract-", dir=base))
    try:
        try:
            with tarfile.open(archive) as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, filter="data")
                else:  # Python < 3.10.12 / 3.11.4: the same refusals, by hand
                    tar.extractall(tmp, members=_checked_members(tar))
        except tarfile.TarError as e:
            raise SeppError(f"cannot extract {archive}: {e}. Delete it and download again") from e
        if not (tmp / folder).is_dir():
            found = sorted(p.name for p in tmp.iterdir())
            raise SeppError(
                f"{archive} does not hold the folder {folder!r} (it holds {found}): "
                "it is not the expected archive; delete it and download again"
            )
        target = base / folder
        if target.exists():
            shutil.rmtree(target)  # an earlier, unfinished extraction (no valid marker)
        os.replace(tmp / folder, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _checked_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for m in members:
        parts = Path(m.name).parts
        if not (m.isfile() or m.isdir()) or Path(m.name).is_absolute() or ".." in parts:
            raise SeppError(f"refusing unsafe archive member {m.name!r}")
    return members


def _write_marker(target: Path, name: str, md5: str) -> None:
    files = {
        p.relative_to(target).as_posix(): p.stat().st_size
        for p in sorted(target.rglob("*"))
        if p.is_file() and p.name != MARKER
    }
    marker: dict[str, Any] = {"dataset": name, "archive_md5": md5, "files": files}
    tmp = target / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1))
    os.replace(tmp, target / MARKER)


def _is_complete(target: Path, md5: str) -> bool:
    """Extracted from an archive with this md5, and every file still there with its size."""
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("archive_md5") != md5:
        return False
    for rel, size in marker.get("files", {}).items():
        p = target / rel
        if not p.is_file() or p.stat().st_size != size:
            return False
    return True


# ---- helpers shared by the binary-format sources -------------------------------------------


def refuse_archive(uri: str, path: str, dataset: str) -> None:
    """Sources read extracted files only: an archive gets an error saying how to extract it."""
    if path.endswith(ARCHIVE_SUFFIXES):
        raise SeppError(
            f"{uri} is an archive: extract it first (tar xzf {posixpath.basename(path)}), or "
            f"let sepp_ray.data.download.download_dataset({dataset!r}, ROOT) fetch and extract "
            "it; then pass the extracted folder"
        )


def digest_file(
    fs: AbstractFileSystem, path: str, hasher: Any, *, full_below: int | None = None
) -> None:
    """Feed a file's size and content into ``hasher``.

    Files of at least ``full_below`` bytes (and above 2 MiB) contribute only their first and
    last MiB: a cheap check for multi-GB files that catches replacement and truncation, not an
    edit in the middle. ``full_below=None`` hashes every byte.
    """
    size = int(fs.size(path))
    hasher.update(f"{size}\n".encode())
    with fs.open(path, "rb") as f:
        if full_below is None or size < max(full_below, 2 * _MIB):
            while block := f.read(_MIB):
                hasher.update(block)
        else:
            hasher.update(f.read(_MIB))
            f.seek(size - _MIB)
            hasher.update(f.read(_MIB))
