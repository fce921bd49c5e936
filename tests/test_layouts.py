"""Real layouts of public benchmarks, built here: each is ingested right or refused with the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from sepp_ray.data.sources import SourceOptions, open_source
from sepp_ray.data.sources.imagefolder import ImageFolderSource
from sepp_ray.data.sources.labels import parse_label_text
from sepp_ray.errors import SeppError
from tests.imagetree import encode, rgb, write_tree

WNIDS = ("n01443537", "n01629819", "n01641577")


def _img(p: Path, seed: int) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(encode(rgb(seed), "JPEG"))


def tiny_imagenet(root: Path, val_labels: bool = True, per_class: int = 2) -> dict[str, str]:
    """Tiny ImageNet's layout: train/<wnid>/images/ + <wnid>_boxes.txt, a flat val/images/
    with val_annotations.txt (TSV: file, wnid, box), an unlabeled test/images/, and
    wnids.txt/words.txt at the top. Returns val file name -> wnid."""
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\tsome thing\n" for w in WNIDS))
    for ci, w in enumerate(WNIDS):
        boxes = []
        for i in range(per_class):
            _img(root / "train" / w / "images" / f"{w}_{i}.JPEG", 10 * ci + i)
            boxes.append(f"{w}_{i}.JPEG\t0\t0\t10\t10")
        (root / "train" / w / f"{w}_boxes.txt").write_text("\n".join(boxes) + "\n")
    truth = {f"val_{i}.JPEG": WNIDS[i % len(WNIDS)] for i in range(2 * len(WNIDS))}
    for i, name in enumerate(truth):
        _img(root / "val" / "images" / name, 100 + i)
    if val_labels:
        rows = [f"{n}\t{w}\t1\t2\t30\t40" for n, w in truth.items()]
        (root / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    for i in range(3):
        _img(root / "test" / "images" / f"test_{i}.JPEG", 200 + i)
    return truth


def _labels(src: ImageFolderSource) -> dict[tuple[str, str], str | None]:
    """(split, file name) -> class name, for every image the source yields."""
    names = src.class_names()
    out: dict[tuple[str, str], str | None] = {}
    for unit in src.units():
        for item in src.read_unit(unit):
            if item.skip is None:
                label = None if item.label is None else names[item.label]
                out[(item.split, Path(item.key).name)] = label
    return out


def test_tiny_imagenet_flat_val_with_annotations_and_unlabeled_test(tmp_path: Path) -> None:
    truth = tiny_imagenet(tmp_path / "tin")
    src = open_source(str(tmp_path / "tin"))
    assert isinstance(src, ImageFolderSource)
    assert src.class_names() == sorted(WNIDS)  # no class named 'images'
    labels = _labels(src)
    for name, wnid in truth.items():
        assert labels[("val", name)] == wnid
    assert all(labels[("test", f"test_{i}.JPEG")] is None for i in range(3))
    assert labels[("train", f"{WNIDS[1]}_0.JPEG")] == WNIDS[1]
    assert src.split_names() == {"train", "val", "test"}
    d = src.describe()
    assert d["label_files"] == {"val": "val/val_annotations.txt"}
    assert "unlabeled" in d["layout"]["test"]
    # wnids.txt and words.txt are set aside, not a split; the boxes are skipped as expected
    assert {p for p, _ in src.ignored} == {"wnids.txt", "words.txt"}
    skips = [i.skip for u in src.units() for i in src.read_unit(u) if i.skip]
    assert skips == ["not an image file: .txt (expected beside images)"] * len(WNIDS)
    assert any("3 .txt (expected beside images)" in w for w in src.warnings)


def test_flat_val_without_labels_is_unlabeled(tmp_path: Path) -> None:
    tiny_imagenet(tmp_path / "tin", val_labels=False)
    src = open_source(str(tmp_path / "tin"))
    labels = _labels(src)
    assert all(v is None for (split, _), v in labels.items() if split == "val")
    assert src.class_names() == sorted(WNIDS)


def test_label_file_beside_the_splits(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_tree(root, classes=("cat", "dog"), per_class=2, splits=("train",))
    for i in range(4):
        _img(root / "val" / "all" / f"v{i}.jpg", 50 + i)
    rows = ["path,label,x,y"] + [f"all/v{i}.jpg,{('cat', 'dog')[i % 2]},1,2" for i in range(4)]
    (root / "val_labels.csv").write_text("\n".join(rows) + "\n")
    # without the option, 'all' looks like a class holding every val image: refused
    with pytest.raises(SeppError, match=r"label_files=val=.*unlabeled_splits=val"):
        open_source(str(root))
    src = open_source(str(root), options=SourceOptions(label_files="val=val_labels.csv"))
    labels = _labels(src)
    assert [labels[("val", f"v{i}.jpg")] for i in range(4)] == ["cat", "dog", "cat", "dog"]
    with pytest.raises(SeppError, match="label_files names splits.*'test'"):
        open_source(str(root), options=SourceOptions(label_files="test=val_labels.csv"))
    with pytest.raises(SeppError, match="not found"):
        open_source(str(root), options=SourceOptions(label_files="val=nope.csv"))
    with pytest.raises(SeppError, match="not split=path"):
        open_source(str(root), options=SourceOptions(label_files="val_labels.csv"))


def test_label_file_option_in_split_folder(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_tree(root, classes=("cat", "dog"), per_class=2, splits=("train",))
    for i in range(4):
        _img(root / "val" / "all" / f"v{i}.jpg", 50 + i)
    rows = ["path,label,x,y"] + [f"all/v{i}.jpg,{('cat', 'dog')[i % 2]},1,2" for i in range(4)]
    (root / "val" / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "val" / "other.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(SeppError, match="2 files that name its images.*label_files=val="):
        open_source(str(root))
    src = open_source(str(root), options=SourceOptions(label_files="val=val/labels.csv"))
    labels = _labels(src)
    assert [labels[("val", f"v{i}.jpg")] for i in range(4)] == ["cat", "dog", "cat", "dog"]
    assert src.class_names() == ["cat", "dog"]
    (root / "val" / "bad.csv").write_text("nothing,here\n")
    with pytest.raises(SeppError, match="names none of split 'val'"):
        open_source(str(root), options=SourceOptions(label_files="val=val/bad.csv"))


def test_single_class_folder_holding_a_split_is_refused_or_unlabeled(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_tree(root, classes=("cat", "dog"), per_class=2, splits=("train",))
    for i in range(3):
        _img(root / "test" / "pics" / f"t{i}.jpg", 70 + i)
    with pytest.raises(SeppError) as e:
        open_source(str(root))
    msg = str(e.value)
    assert "single class folder 'pics'" in msg and "unlabeled_splits=test" in msg
    assert "layout seen" in msg and "layout_check=warn" in msg
    src = open_source(str(root), options=SourceOptions(unlabeled_splits="test"))
    assert all(v is None for (s, _), v in _labels(src).items() if s == "test")
    seen = open_source(str(root), options=SourceOptions(layout_check="warn"))
    assert seen.class_names() == ["cat", "dog", "pics"]


def test_class_in_an_evaluation_split_only_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_tree(root, classes=("cat", "dog"), per_class=2, splits=("train",))
    write_tree(root, classes=("cat", "bird"), per_class=2, splits=("test",))
    with pytest.raises(SeppError, match=r"split 'test' has 1 classes that train lacks \(bird\)"):
        open_source(str(root))
    src = open_source(str(root), options=SourceOptions(layout_check="warn"))
    assert any("train lacks" in w for w in src.warnings)
    assert any("lacks 1 of train's 2 classes (dog)" in w for w in src.warnings)


def test_train_class_missing_from_test_is_a_warning(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_tree(root, classes=("cat", "dog", "owl"), per_class=2, splits=("train",))
    write_tree(root, classes=("cat", "dog"), per_class=2, splits=("test",))
    src = open_source(str(root))
    assert src.warnings == [
        "split 'test' lacks 1 of train's 3 classes (owl); its accuracy covers the others only"
    ]


def test_stray_files_in_class_folders_say_what_they_are(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_tree(root, classes=("cat", "dog"), per_class=2)
    (root / "cat" / "notes.txt").write_text("hello")
    (root / "dog" / "tool.exe").write_bytes(b"MZ")
    src = open_source(str(root))
    skips = sorted(i.skip or "" for u in src.units() for i in src.read_unit(u) if i.skip)
    assert skips == [
        "not an image file: .exe (unexpected)",
        "not an image file: .txt (expected beside images)",
    ]
    (w,) = src.warnings
    assert "1 .exe (unexpected)" in w and "check the folders" in w


def test_flat_root_with_label_file(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for i in range(4):
        _img(root / "images" / f"{i}.png", i)
    (root / "labels.tsv").write_text("".join(f"{i}.png\t{'ab'[i % 2]}\n" for i in range(4)))
    src = open_source(str(root))
    labels = _labels(src)
    assert [labels[("train", f"{i}.png")] for i in range(4)] == ["a", "b", "a", "b"]
    before = src.fingerprint()
    (root / "labels.tsv").write_text("".join(f"{i}.png\tb\n" for i in range(4)) + "\n")
    assert open_source(str(root)).fingerprint() != before  # labels are part of the content


def test_parse_label_text_formats() -> None:
    assert parse_label_text("a.jpg,cat\nb.jpg,dog,1,2\n") == [("a.jpg", "cat"), ("b.jpg", "dog")]
    assert parse_label_text("a.jpg\tcat\t1\n") == [("a.jpg", "cat")]
    assert parse_label_text("a.jpg cat\n# note\n") == [("a.jpg", "cat")]
    # ImageNet's LOC_val_solution.csv: the class is the first word of PredictionString
    loc = "ImageId,PredictionString\nILSVRC2012_val_1,n015 1 2 3 4 n015 5 6 7 8\n"
    assert parse_label_text(loc)[1] == ("ILSVRC2012_val_1", "n015")


def test_ingest_tiny_imagenet_layout(tmp_path: Path, ray_cluster: None) -> None:
    from sepp_ray.data.ingest import ImageOptions, ingest

    truth = tiny_imagenet(tmp_path / "tin")
    src = open_source(str(tmp_path / "tin"))
    m = ingest(src, str(tmp_path / "out"), ImageOptions(val_fraction=0.0))
    sp = m["splits"]
    assert m["classes"] == sorted(WNIDS)
    assert sp["val"]["labeled"] == len(truth) and sp["test"]["labeled"] == 0
    assert sp["val"]["per_class"] == {w: 2 for w in WNIDS}
    assert m["skipped"]["count"] == len(WNIDS)  # the boxes files
