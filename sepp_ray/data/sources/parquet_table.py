"""A Parquet table of encoded images: one file, or a folder of ``*.parquet`` (searched
recursively), such as a Hugging Face dataset export.

The image column holds encoded bytes, either plain binary or a struct with a ``bytes`` field
(the Hugging Face ``Image`` feature; a row with null bytes is yielded with ``skip`` set, so
ingest logs it). Labels are ints (negative or null: unlabeled, the Hugging Face convention) or
strings (class names, sorted, become indices). Class names come from ``class_names``, else
from the Hugging Face ``ClassLabel`` names in the schema metadata, else from the labels.
Splits come from ``split_column`` (auto: a column named "split"), else from the file name
(``train-00000-of-00001.parquet``, ``test/part-0.parquet``: how Hugging Face lays out splits),
else ``default_split``. One work unit per row group.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sepp_ray.data.download import digest_file
from sepp_ray.data.sources.base import RawItem, WorkUnit
from sepp_ray.errors import SeppError
from sepp_ray.storage import filesystem

IMAGE_NAMES = ("image", "img")
LABEL_NAMES = ("label", "labels", "fine_label")
SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "unlabeled")
_SPLIT_PREFIX = re.compile(rf"^({'|'.join(SPLIT_NAMES)})([-_.]|$)")
# Files at least this big are fingerprinted by size + first and last MiB + the footer position
FULL_HASH_BELOW = 64 << 20


def _value_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _is_binary(t: pa.DataType) -> bool:
    is_view = getattr(pa.types, "is_binary_view", lambda _: False)
    return bool(pa.types.is_binary(t) or pa.types.is_large_binary(t) or is_view(t))


def _is_image_type(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        i = t.get_field_index("bytes")
        return i >= 0 and _is_binary(t.field(i).type)
    return _is_binary(t)


def _is_string(t: pa.DataType) -> bool:
    t = _value_type(t)
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t))


def split_from_name(rel: str) -> str | None:
    """The split a Hugging Face style file name implies: ``train-0000.parquet``, ``test/x``."""
    parts = rel.split("/")
    m = _SPLIT_PREFIX.match(parts[-1])
    if m:
        return m.group(1)
    if len(parts) > 1 and parts[-2] in SPLIT_NAMES:
        return parts[-2]
    return None


class ParquetTableSource:
    """Rows of Parquet files; units are (file, row group)."""

    kind = "parquet"

    def __init__(
        self,
        uri: str,
        image_column: str | None = None,
        label_column: str | None = None,
        split_column: str | None = None,
        id_column: str | None = None,
        class_names: Sequence[str] | None = None,
        default_split: str = "train",
    ) -> None:
        self.root = str(uri)
        self.default_split = default_split
        fs, path = filesystem(self.root)
        if not fs.exists(path):
            raise SeppError(f"parquet source {self.root} does not exist: check the path/URI")
        if fs.isdir(path):
            found = sorted(p for p in fs.find(path, withdirs=False) if p.endswith(".parquet"))
            self._files = [
                posixpath.relpath(p, path)
                for p in found
                if not any(s.startswith((".", "_")) for s in posixpath.relpath(p, path).split("/"))
            ]
            self._dir = path
            if not self._files:
                raise SeppError(f"no *.parquet files under {self.root}: pass a file or a folder")
        else:
            self._dir, name = posixpath.split(path)
            self._files = [name]
        schema = self._schema(self._files[0])
        columns = {f.name: f.type for f in schema}
        listing = ", ".join(f"{n} ({t})" for n, t in columns.items())

        def need(name: str, what: str) -> str:
            if name not in columns:
                raise SeppError(
                    f"{self.root} has no {what} column {name!r}: its columns are {listing}"
                )
            return name

        # image column
        if image_column is not None:
            self.image_column = need(image_column, "image")
        else:
            named = [n for n in IMAGE_NAMES if n in columns and _is_image_type(columns[n])]
            typed = [n for n, t in columns.items() if _is_image_type(t)]
            if not named and len(typed) != 1:
                raise SeppError(
                    f"cannot tell the image column of {self.root} ("
                    f"{'several' if typed else 'no'} binary columns): its columns are "
                    f"{listing}; pass image_column="
                )
            self.image_column = (named or typed)[0]
        if not _is_image_type(columns[self.image_column]):
            raise SeppError(
                f"image column {self.image_column!r} of {self.root} is "
                f"{columns[self.image_column]}, expected binary (encoded image bytes) or a "
                "struct with a 'bytes' field; its columns are " + listing
            )
        self._struct = pa.types.is_struct(columns[self.image_column])
        # label, split and id columns
        if label_column is not None:
            self.label_column: str | None = need(label_column, "label")
        else:
            self.label_column = next((n for n in LABEL_NAMES if n in columns), None)
        if split_column is not None:
            self.split_column: str | None = need(split_column, "split")
        else:
            self.split_column = "split" if "split" in columns else None
        self.id_column = need(id_column, "id") if id_column is not None else None
        for col in (self.label_column, self.split_column):
            t = columns[col] if col else None
            if col and not (_is_string(t) or pa.types.is_integer(_value_type(t))):
                raise SeppError(f"column {col!r} of {self.root} is {t}: expected int or string")
        self._check_columns()
        self._string_labels = False
        self._index: dict[str, int] = {}
        self._classes = self._class_names(schema, class_names)
        if self.id_column:
            self._check_ids()

    # ---- Source
    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "uri": self.root,
            "files": len(self._files),
            "image_column": self.image_column,
            "label_column": self.label_column,
            "split_column": self.split_column,
            "id_column": self.id_column,
            "default_split": self.default_split,
        }

    def class_names(self) -> list[str]:
        return list(self._classes)

    def units(self) -> list[WorkUnit]:
        out: list[WorkUnit] = []
        for rel in self._files:
            meta = self._metadata(rel)
            offset = 0
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                out.append({"file": rel, "row_group": g, "row_offset": offset, "rows": n})
                offset += n
        return out

    def read_unit(self, unit: WorkUnit) -> Iterator[RawItem]:
        rel, offset = unit["file"], unit["row_offset"]
        cols = [c for c in (self.image_column, self.label_column, self.split_column) if c]
        if self.id_column:
            cols.append(self.id_column)
        fs, _ = filesystem(self.root)
        with fs.open(posixpath.join(self._dir, rel), "rb") as f:
            table = pq.ParquetFile(f).read_row_group(unit["row_group"], columns=cols)
        n = table.num_rows
        images = table.column(self.image_column)
        if self._struct:
            images = pc.struct_field(images, "bytes")
        payloads = images.to_pylist()
        labels = self._labels(table.column(self.label_column)) if self.label_column else [None] * n
        name_split = split_from_name(rel) or self.default_split
        splits = (
            [
                s if s is not None else name_split
                for s in table.column(self.split_column).to_pylist()
            ]
            if self.split_column
            else [name_split] * n
        )
        ids = table.column(self.id_column).to_pylist() if self.id_column else None
        origin = posixpath.join(self.root.rstrip("/"), rel) if len(self._files) > 1 else self.root
        for i in range(n):
            row = offset + i
            data = payloads[i]
            yield RawItem(
                key=str(ids[i]) if ids is not None else f"{rel}#{row}",
                origin=f"{origin}#{row}",
                payload=b"" if data is None else bytes(data),
                label=labels[i],
                split=str(splits[i]),
                skip="image bytes are null (an image stored by path is not supported)"
                if data is None
                else None,
            )

    def fingerprint(self) -> str:
        """sha256 of every file (whole when small, size + first and last MiB when large) and the
        column choices."""
        fs, _ = filesystem(self.root)
        h = hashlib.sha256(json.dumps(self.describe() | {"classes": self._classes}).encode())
        for rel in self._files:
            h.update(f"{rel}\n".encode())
            digest_file(fs, posixpath.join(self._dir, rel), h, full_below=FULL_HASH_BELOW)
        return h.hexdigest()

    # ---- internals
    def _metadata(self, rel: str) -> pq.FileMetaData:
        fs, _ = filesystem(self.root)
        try:
            with fs.open(posixpath.join(self._dir, rel), "rb") as f:
                return pq.ParquetFile(f).metadata
        except (pa.ArrowInvalid, OSError) as e:
            raise SeppError(f"{rel} in {self.root} is not a readable Parquet file: {e}") from e

    def _schema(self, rel: str) -> pa.Schema:
        return self._metadata(rel).schema.to_arrow_schema()

    def _column(self, name: str) -> pa.ChunkedArray:
        """One column over all files, in file order."""
        fs, _ = filesystem(self.root)
        parts = []
        for rel in self._files:
            with fs.open(posixpath.join(self._dir, rel), "rb") as f:
                parts.extend(pq.ParquetFile(f).read(columns=[name]).column(0).chunks)
        return pa.chunked_array(parts) if parts else pa.chunked_array([], pa.null())

    def _check_columns(self) -> None:
        """Every file must hold the chosen columns."""
        wanted = [c for c in (self.image_column, self.label_column, self.split_column) if c]
        wanted += [self.id_column] if self.id_column else []
        for rel in self._files[1:]:
            names = self._schema(rel).names
            missing = [c for c in wanted if c not in names]
            if missing:
                raise SeppError(
                    f"{rel} in {self.root} lacks column(s) {missing} that {self._files[0]} has: "
                    f"its columns are {names}; every file must share the schema"
                )

    def _class_names(self, schema: pa.Schema, given: Sequence[str] | None) -> list[str]:
        """Class names, and a check that every label of the table fits them."""
        if self.label_column is None:
            return list(given or [])
        labels = self._column(self.label_column)
        self._string_labels = _is_string(labels.type)
        if self._string_labels:
            present = sorted({v for v in labels.to_pylist() if v is not None})
            names = list(given) if given is not None else present
            unknown = sorted(set(present) - set(names))
            if unknown:
                raise SeppError(
                    f"labels {unknown[:10]} of {self.root} are not in class_names: add them, or "
                    "leave class_names unset to use the sorted distinct labels"
                )
            self._index = {c: i for i, c in enumerate(names)}
            return names
        top = pc.max(labels).as_py()
        found = list(given) if given is not None else self._hf_names(schema)
        if found is None:
            return [str(i) for i in range((top + 1) if top is not None and top >= 0 else 0)]
        if top is not None and top >= len(found):
            raise SeppError(
                f"label {top} of {self.root} is out of range for {len(found)} class names: "
                "pass the full class_names list"
            )
        return found

    def _hf_names(self, schema: pa.Schema) -> list[str] | None:
        """ClassLabel names a Hugging Face export keeps in the schema metadata."""
        raw = (schema.metadata or {}).get(b"huggingface")
        if raw is None:
            return None
        try:
            feature = json.loads(raw)["info"]["features"][self.label_column]
            names = feature["names"]
        except (TypeError, KeyError, ValueError):
            return None
        return [str(n) for n in names] if isinstance(names, list) else None

    def _labels(self, column: pa.ChunkedArray) -> list[int | None]:
        values = column.to_pylist()
        if self._string_labels:
            return [None if v is None else self._index[v] for v in values]
        return [None if v is None or v < 0 else int(v) for v in values]

    def _check_ids(self) -> None:
        assert self.id_column is not None
        ids = self._column(self.id_column)
        if ids.null_count:
            raise SeppError(f"id column {self.id_column!r} of {self.root} has null values")
        keys = pc.cast(ids, pa.string()) if not _is_string(ids.type) else ids
        if pc.count_distinct(keys).as_py() != len(keys):
            raise SeppError(
                f"id column {self.id_column!r} of {self.root} has duplicate values: ids must be "
                "unique; choose another column, or leave id_column unset (file#row keys)"
            )
