"""Class lists shipped with the package, and the `source_options.classes` filter they feed.

A benchmark subset such as ImageNet-100 is defined by its list of classes, not by a download:
users ingest it from their own ImageNet tree, keeping only the listed classes. The list names
the subset, so a run on it is reproducible and its name is what the dry-run plan sizes it by.

``imagenet100.txt``: CMC's 100 classes (arXiv 1906.05849), the ImageNet-100 of the SSL papers.
``imagenet1k.txt``: the 1,000 ILSVRC-2012 classes; as a filter it checks a tree is complete.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from importlib import resources

from sepp_ray.errors import SeppError

# shipped list name -> its file beside this module
SHIPPED = {"imagenet100": "imagenet100.txt", "imagenet1k": "imagenet1k.txt"}


@dataclass(frozen=True)
class ClassList:
    """Named class list: ``name`` is a shipped list's name or the file it was read from."""

    name: str
    classes: tuple[str, ...]


def parse_class_list(text: str, name: str) -> ClassList:
    """One class a line; blank lines and ``#`` comments skipped. Refuses an empty list and
    a class listed twice (a list with a duplicate is not the subset it claims to be)."""
    classes = tuple(
        line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()
    )
    if not classes:
        raise SeppError(f"class list {name} names no class: one class name a line")
    twice = sorted(c for c, n in Counter(classes).items() if n > 1)
    if twice:
        raise SeppError(f"class list {name} names {', '.join(twice[:5])} more than once")
    return ClassList(name, classes)


def load_class_list(spec: str) -> ClassList:
    """A shipped list by name (``imagenet100``, ``imagenet1k``), else a text file (path or
    URI) of class names, one a line."""
    if spec in SHIPPED:
        text = resources.files(__name__).joinpath(SHIPPED[spec]).read_text("utf-8")
        return parse_class_list(text, spec)
    from sepp_ray.storage import filesystem

    fs, path = filesystem(spec)
    if not fs.isfile(path):
        raise SeppError(
            f"class list {spec!r} is neither a shipped list ({', '.join(SHIPPED)}) nor a file: "
            "give one of those names or a text file of class names, one a line"
        )
    with fs.open(path, "rb") as f:
        return parse_class_list(f.read().decode("utf-8"), spec)
