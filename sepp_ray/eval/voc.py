"""Pascal VOC detection data: reading the on-disk format, COCO conversion, and a toy generator.

Layout (Everingham et al., IJCV 2010): ``JPEGImages/<id>.jpg``, ``Annotations/<id>.xml`` and
``ImageSets/Main/<split>.txt`` (one image id per line). The root may be any URI. Ground truth is
converted to COCO's format in memory so pycocotools scores AP, AP50 and AP75 (the figures MoCo,
arXiv 1911.05722, reports for VOC transfer); "difficult" objects become COCO crowd regions,
which pycocotools ignores as VOC's own metric does.
"""

from __future__ import annotations

import io
import posixpath
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sepp_ray.errors import SeppError
from sepp_ray.storage import filesystem

TOY_CLASSES = ("disc", "square", "triangle")


@dataclass(frozen=True)
class VocImage:
    """One annotated image; boxes in pixels, x1 y1 x2 y2, 0-based, exclusive right/bottom."""

    image_id: str
    path: str  # full path on the root's filesystem
    width: int
    height: int
    boxes: np.ndarray  # K x 4 float32
    names: list[str]
    difficult: np.ndarray  # K bool


def _text(node: ET.Element, tag: str, where: str) -> str:
    found = node.find(tag)
    if found is None or found.text is None:
        raise SeppError(f"{where}: annotation has no <{tag}>; is this a VOC XML file?")
    return found.text.strip()


def parse_annotation(xml: bytes, image_id: str, path: str, where: str) -> VocImage:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise SeppError(f"{where} is not valid XML: {e}") from e
    size = root.find("size")
    if size is None:
        raise SeppError(f"{where}: annotation has no <size>")
    w, h = int(_text(size, "width", where)), int(_text(size, "height", where))
    boxes, names, diff = [], [], []
    for obj in root.findall("object"):
        bb = obj.find("bndbox")
        if bb is None:
            raise SeppError(f"{where}: an <object> has no <bndbox>")
        # VOC boxes are 1-based inclusive pixel indices
        x1, y1, x2, y2 = (float(_text(bb, t, where)) for t in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([x1 - 1, y1 - 1, x2, y2])
        names.append(_text(obj, "name", where))
        d = obj.find("difficult")
        diff.append(d is not None and (d.text or "0").strip() == "1")
    return VocImage(
        image_id,
        path,
        w,
        h,
        np.asarray(boxes, np.float32).reshape(-1, 4),
        names,
        np.asarray(diff, bool),
    )


def read_voc(root: str, split: str) -> list[VocImage]:
    """The images listed in ``ImageSets/Main/<split>.txt`` with their annotations."""
    fs, base = filesystem(root)
    list_file = posixpath.join(base, "ImageSets", "Main", f"{split}.txt")
    if not fs.exists(list_file):
        have = []
        main = posixpath.join(base, "ImageSets", "Main")
        if fs.exists(main):
            have = sorted(posixpath.basename(p)[:-4] for p in fs.ls(main, detail=False))
        raise SeppError(
            f"{root} is not a VOC dataset with split {split!r}: {list_file} is missing"
            + (f" (it has {have})" if have else "")
            + ". Expected JPEGImages/, Annotations/ and ImageSets/Main/<split>.txt"
        )
    with fs.open(list_file, "r") as f:
        ids = [line.split()[0] for line in f.read().splitlines() if line.strip()]
    if not ids:
        raise SeppError(f"{list_file} lists no image")
    out = []
    for image_id in ids:
        xml_path = posixpath.join(base, "Annotations", f"{image_id}.xml")
        if not fs.exists(xml_path):
            raise SeppError(f"annotation {xml_path} of image {image_id} is missing")
        with fs.open(xml_path, "rb") as f:
            xml = f.read()
        img_path = posixpath.join(base, "JPEGImages", f"{image_id}.jpg")
        out.append(parse_annotation(xml, image_id, img_path, xml_path))
    return out


def read_image(root: str, item: VocImage) -> np.ndarray:
    """H x W x 3 uint8 RGB."""
    fs, _ = filesystem(root)
    with fs.open(item.path, "rb") as f:
        with Image.open(io.BytesIO(f.read())) as img:
            return np.array(img.convert("RGB"))


def class_names(*splits: list[VocImage]) -> list[str]:
    """Sorted object names (VOC's 20 classes are already in alphabetical order)."""
    return sorted({n for items in splits for it in items for n in it.names})


def to_coco(items: list[VocImage], classes: list[str]) -> dict[str, Any]:
    """COCO ground truth: image ids are list positions, category ids are class index + 1."""
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    index = {c: i + 1 for i, c in enumerate(classes)}
    for i, it in enumerate(items):
        images.append({"id": i, "width": it.width, "height": it.height, "file_name": it.image_id})
        for box, name, hard in zip(it.boxes, it.names, it.difficult, strict=True):
            if name not in index:
                continue  # a class absent from training cannot be detected: VOC leaves it out
            x1, y1, x2, y2 = (float(v) for v in box)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": index[name],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": int(hard),
                }
            )
    return {
        "info": {},
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)],
    }


def _xml(
    image_id: str, w: int, h: int, objects: list[tuple[str, tuple[int, int, int, int]]]
) -> str:
    objs = "".join(
        f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b in objects
    )
    return (
        f"<annotation><filename>{image_id}.jpg</filename><size><width>{w}</width>"
        f"<height>{h}</height><depth>3</depth></size>{objs}</annotation>"
    )


def write_toy_voc(
    root: str | Path, n_train: int = 8, n_val: int = 4, size: int = 64, seed: int = 0
) -> list[str]:
    """A VOC-format folder of coloured shapes (1-2 per image) on noise; returns the classes.

    Real JPEG files and XML annotations, for tests and demos of the detection protocol.
    """
    root = Path(root)
    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids: dict[str, list[str]] = {"train": [], "val": []}
    for i in range(n_train + n_val):
        split = "train" if i < n_train else "val"
        image_id = f"{i:06d}"
        bg = rng.integers(0, 70, 3)
        arr = np.clip(bg + rng.integers(-15, 16, (size, size, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        draw = ImageDraw.Draw(img)
        objects: list[tuple[str, tuple[int, int, int, int]]] = []
        for _ in range(int(rng.integers(1, 3))):
            cls = int(rng.integers(len(TOY_CLASSES)))
            side = int(rng.integers(size // 4, size // 2 + 1))
            x0 = int(rng.integers(0, size - side + 1))
            y0 = int(rng.integers(0, size - side + 1))
            x1, y1 = x0 + side - 1, y0 + side - 1
            color = tuple(int(v) for v in rng.integers(150, 256, 3))
            if TOY_CLASSES[cls] == "disc":
                draw.ellipse((x0, y0, x1, y1), fill=color)
            elif TOY_CLASSES[cls] == "square":
                draw.rectangle((x0, y0, x1, y1), fill=color)
            else:
                draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=color)
            objects.append((TOY_CLASSES[cls], (x0 + 1, y0 + 1, x1 + 1, y1 + 1)))
        img.save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        (root / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, size, size, objects))
        ids[split].append(image_id)
    for split, names in ids.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return list(TOY_CLASSES)
