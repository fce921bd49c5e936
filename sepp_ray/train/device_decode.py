"""JPEG batches decoded on the training device, every view's random resized crop taken there.

``decode_on=gpu`` ships JPEG bytes to the rank (decode mode "bytes") and does here what the CPU
read tasks do in "crop" mode: each stored image is decoded once (nvJPEG on CUDA, batched), each
view's box is drawn as torchvision's ``RandomResizedCrop`` draws it, from that image's own height
and width (stored images of any size: ImageNet at shorter side 256 included), and all boxes of
one output size are resampled in one batched gather. The GPU recipe then runs without its crop.
A dataset stored at the training size and a spec without view crops keeps the "full" behaviour:
whole images, cropped by the GPU recipe.

The decoder: TorchCodec's ``decode_jpeg`` when TorchCodec is installed, else torchvision's.
torchvision 0.29 deprecates its image decoders in favour of TorchCodec's (from torchcodec 0.16),
so TorchCodec is the one that will be maintained. Both take the same call (a list of CPU byte
tensors, ``mode="RGB"``, ``device=...``; nvJPEG batches the list on CUDA), and torchvision's
covers the machines where TorchCodec is absent (the GPU image has torchvision 0.26 only).

Four-channel (CMYK/YCCK) JPEGs, and any image the device decoder refuses, are decoded by PIL on
the CPU and counted (``DeviceBatch.cpu_decoded``); grayscale JPEGs decode to RGB. Pure torch: the
same code runs on CPU, where the tests run it.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from sepp_ray.errors import SeppError

BYTES_KEYS = ("image_bytes", "image2_bytes")
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers
_GATHER_ELEMS = 1 << 22  # output pixels per resampling chunk: bounds the gather's memory


class CropSpec(Protocol):
    """One view's random resized crop (`sepp_ray.train.decode.CropSpec` fits)."""

    @property
    def size(self) -> int: ...
    @property
    def scale(self) -> tuple[float, float]: ...
    @property
    def ratio(self) -> tuple[float, float]: ...


class DecodeSpec(Protocol):
    """The view crops of a decode spec (`sepp_ray.train.decode.DecodeSpec` fits); decode.py
    calls this module, so it is not imported here."""

    @property
    def view1(self) -> CropSpec | None: ...
    @property
    def view2(self) -> CropSpec | None: ...
    @property
    def local(self) -> CropSpec | None: ...
    @property
    def n_local(self) -> int: ...


class DeviceBatch(dict[str, Tensor]):
    """A decoded batch's tensors; ``cpu_decoded`` counts images the device decoder left to PIL."""

    cpu_decoded: int = 0


def crop_generator(device: Any, *entropy: int) -> torch.Generator:
    """The crops' generator on ``device``, seeded by ``entropy`` (the worker gives (seed, epoch,
    rank)): like the CPU read tasks' crops, a resumed run draws the same boxes."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(np.random.SeedSequence(list(entropy)).generate_state(1)[0]))
    return g


@functools.lru_cache(maxsize=1)
def jpeg_decoder() -> Callable[..., list[Tensor]]:
    """TorchCodec's ``decode_jpeg`` if installed, else torchvision's (see the module docstring)."""
    try:
        from torchcodec.decoders import decode_jpeg

        return decode_jpeg  # type: ignore[no-any-return]
    except ImportError:
        from torchvision.io import decode_jpeg as tv_decode

        def decode(data: list[Tensor], mode: str, device: torch.device) -> list[Tensor]:
            with warnings.catch_warnings():  # the deprecation notice, once per call
                warnings.simplefilter("ignore", DeprecationWarning)
                return tv_decode(data, mode=mode, device=device)  # type: ignore[no-any-return]

        return decode


def jpeg_components(blob: bytes) -> int:
    """Colour components of a JPEG from its start-of-frame header (0 when none is found)."""
    i, n = 2, len(blob)
    while i + 4 <= n:
        if blob[i] != 0xFF:
            return 0
        marker = blob[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9 or marker == 0xDA:  # end of image, start of scan: no frame header
            return 0
        length = int.from_bytes(blob[i + 2 : i + 4], "big")
        if marker in _SOF:
            return blob[i + 9] if i + 9 < n else 0
        i += 2 + length
    return 0


def _check_jpeg(blobs: Sequence[bytes | None]) -> None:
    if any(b is None or b[:2] != b"\xff\xd8" for b in blobs):
        raise SeppError(
            "decode_on=gpu needs JPEG shards: ingest with images.encoding=jpeg, or decode on the "
            "CPU (decode_on=cpu)"
        )


def _pil_decode(blob: bytes, device: torch.device) -> Tensor:
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(blob)).convert("RGB")
    except Exception as e:  # PIL raises several types for a broken file
        raise SeppError(
            f"a JPEG in the batch cannot be decoded ({e}); check the dataset with `sepp inspect`, "
            "or decode on the CPU (decode_on=cpu) to see which image"
        ) from e
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).to(device)  # 3 x H x W


def decode_images(blobs: Sequence[bytes], device: torch.device) -> tuple[list[Tensor], int]:
    """JPEG bytes -> 3 x H x W uint8 tensors on ``device`` (one batched decoder call) and how
    many went to PIL on the CPU: 4-channel JPEGs, or all of a batch the decoder refuses one by
    one when it refuses the batch."""
    _check_jpeg(blobs)
    decode = jpeg_decoder()
    on_cpu = {i for i, b in enumerate(blobs) if jpeg_components(b) == 4}
    todo = [i for i in range(len(blobs)) if i not in on_cpu]
    data = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in todo]
    out: list[Tensor | None] = [None] * len(blobs)
    try:
        decoded = decode(data, mode="RGB", device=device) if data else []
        for i, t in zip(todo, decoded, strict=True):
            out[i] = t
    except (RuntimeError, ValueError):  # no partial results: retry one by one, PIL for refusals
        for i, d in zip(todo, data, strict=True):
            try:
                out[i] = decode([d], mode="RGB", device=device)[0]
            except (RuntimeError, ValueError):
                on_cpu.add(i)
    for i in on_cpu:
        out[i] = _pil_decode(blobs[i], device)
    return [t for t in out if t is not None], len(on_cpu)


def sample_boxes(
    heights: Tensor,
    widths: Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> Tensor:
    """``RandomResizedCrop.get_params`` for N images of their own sizes (N float tensors on the
    generator's device): 10 tries each, the first valid wins, else the central fallback.
    Returns N x 4 float (top, left, height, width), whole pixels inside each image."""
    n, dev = heights.shape[0], generator.device
    h, w = heights.float()[:, None], widths.float()[:, None]  # N x 1
    u = torch.rand(n, 10, 2, generator=generator, device=dev)  # area, log-ratio draws
    pos = torch.rand(n, 2, generator=generator, device=dev)  # top, left draws
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[..., 0])  # N x 10
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[..., 1])
    cw = torch.round(torch.sqrt(area * aspect))
    ch = torch.round(torch.sqrt(area / aspect))
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)  # N x 10
    first = ok.int().argmax(dim=1, keepdim=True)  # the first valid try (0 if none)
    cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]  # N
    h, w = h[:, 0], w[:, 0]
    in_ratio = w / h  # fallback: the largest central crop with its ratio inside `ratio`
    fw = torch.where(in_ratio > max(ratio), torch.round(h * max(ratio)), w)
    fh = torch.where(in_ratio < min(ratio), torch.round(w / min(ratio)), h)
    found = ok.any(dim=1)
    cw, ch = torch.where(found, cw, fw), torch.where(found, ch, fh)
    top = torch.where(found, torch.floor(pos[:, 0] * (h - ch + 1)), torch.floor((h - ch) / 2))
    left = torch.where(found, torch.floor(pos[:, 1] * (w - cw + 1)), torch.floor((w - cw) / 2))
    top = torch.minimum(top, h - ch)  # rand() rounding up to 1
    left = torch.minimum(left, w - cw)
    return torch.stack((top, left, ch, cw), dim=1)


def _taps(start: Tensor, length: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear taps of ``interpolate(crop, size, align_corners=False)`` along one axis: the two
    source indices (absolute, N x size long, clamped inside the crop) and the second's weight."""
    o = torch.arange(size, device=start.device, dtype=torch.float32) + 0.5
    src = (o * (length[:, None] / size) - 0.5).clamp(min=0.0)  # N x size, relative to the crop
    i0 = torch.minimum(src.floor(), length[:, None] - 1.0)
    i1 = torch.minimum(i0 + 1.0, length[:, None] - 1.0)
    frac = src - i0
    return (start[:, None] + i0).long(), (start[:, None] + i1).long(), frac


def pack(images: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """3 x H x W uint8 images of any sizes -> one P x 4 pixel buffer (each image's rows, RGB and
    a pad byte, so a pixel is one 32-bit word to gather) and each image's offset, height and
    width (U long tensors): no padding between images, so no memory wasted on mixed sizes."""
    dev = images[0].device
    sizes = [(int(t.shape[1]), int(t.shape[2])) for t in images]
    counts = torch.tensor([h * w for h, w in sizes], dtype=torch.long)
    offsets = torch.cumsum(counts, 0) - counts
    pixels = torch.zeros(int(counts.sum()), 4, dtype=torch.uint8, device=dev)
    for t, o, (h, w) in zip(images, offsets.tolist(), sizes, strict=True):
        pixels[o : o + h * w, :3].view(h, w, 3).copy_(t.permute(1, 2, 0))
    hw = torch.tensor(sizes, dtype=torch.long).to(dev, non_blocking=True)  # U x 2
    return pixels, offsets.to(dev, non_blocking=True), hw[:, 0], hw[:, 1]


def resample(
    pixels: Tensor, offsets: Tensor, widths: Tensor, src: Tensor, boxes: Tensor, size: int
) -> Tensor:
    """Crop ``boxes`` (N x 4: top, left, height, width) of packed images ``src`` (N indices
    into `pack`'s output) and resize each to size x size: N x 3 x S x S float in [0, 255].

    Equals ``F.resized_crop(img, *box, [size, size], bilinear, antialias=False)`` per crop up
    to float rounding; taps never leave the crop, so neighbouring pixels and other images never
    leak in. One gather of the four taps of every output pixel, then three lerps."""
    words = pixels.view(torch.int32).view(-1)  # P: one word per pixel
    itype = torch.int32 if len(words) < 2**31 else torch.long  # half the index traffic
    out = torch.empty(len(src), 3, size, size, device=pixels.device)
    step = max(1, _GATHER_ELEMS // (size * size))
    for a in range(0, len(src), step):  # chunks bound the gather's temporaries
        s, b = src[a : a + step], boxes[a : a + step]
        n = len(s)
        y0, y1, fy = _taps(b[:, 0], b[:, 2], size)  # each n x S
        x0, x1, fx = _taps(b[:, 1], b[:, 3], size)
        base, w = offsets[s][:, None], widths[s][:, None]
        r0, r1 = base + y0 * w, base + y1 * w  # n x S: first pixel of each source row
        rows = torch.stack((r0, r0, r1, r1)).to(itype)[..., None]  # 4 x n x S x 1
        cols = torch.stack((x0, x1, x0, x1)).to(itype)[:, :, None]  # 4 x n x 1 x S
        taps = torch.index_select(words, 0, (rows + cols).view(-1))  # 4 n S S pixels
        px = taps.view(torch.uint8).view(4, n, size, size, 4)[..., :3]  # RGB of the taps
        px = px.permute(0, 1, 4, 2, 3).float()  # 4 x n x 3 x S x S: weights vary along S
        wx, wy = fx[:, None, None, :], fy[:, None, :, None]
        upper = torch.lerp(px[0], px[1], wx)
        lower = torch.lerp(px[2], px[3], wx)
        out[a : a + n] = torch.lerp(upper, lower, wy)
    return out


def _finish(x: Tensor, dtype: torch.dtype) -> Tensor:
    if dtype == torch.uint8:
        return x.round_().clamp_(0.0, 255.0).to(torch.uint8)
    return x.div_(255.0).to(dtype)


def _view_jobs(spec: DecodeSpec, n: int, src2: Tensor) -> list[tuple[str, CropSpec, Tensor]]:
    """(output key, crop, source images) of every view, in the order their boxes are drawn."""
    assert spec.view1 is not None and spec.view2 is not None
    first = torch.arange(n, device=src2.device)
    jobs = [("image", spec.view1, first), ("image2", spec.view2, src2)]
    if spec.local is not None and spec.n_local:
        jobs.append(("local", spec.local, first.repeat_interleave(spec.n_local)))
    return jobs


def crop_views(
    images: list[Tensor],
    src2: Tensor,
    spec: DecodeSpec,
    generator: torch.Generator,
    dtype: torch.dtype = torch.uint8,
) -> dict[str, Tensor]:
    """Every view's random resized crop of decoded ``images`` (view 1 and local crops from the
    first B, view 2 from ``src2``): image, image2 B x S x S x 3, local B x L x s x s x 3."""
    n = len(src2)
    pixels, offsets, heights, widths = pack(images)
    jobs = _view_jobs(spec, n, src2)
    g_dev = generator.device
    boxes = [  # drawn on the generator's device (the images' own, in training)
        sample_boxes(heights[s].to(g_dev), widths[s].to(g_dev), c.scale, c.ratio, generator)
        for _, c, s in jobs
    ]
    boxes = [b.to(pixels.device) for b in boxes]
    out: dict[str, Tensor] = {}
    for size in sorted({c.size for _, c, _ in jobs}):  # one resample per output size
        sel = [i for i, (_, c, _) in enumerate(jobs) if c.size == size]
        src = torch.cat([jobs[i][2] for i in sel])
        views = resample(pixels, offsets, widths, src, torch.cat([boxes[i] for i in sel]), size)
        for i, part in zip(sel, views.split([len(jobs[i][2]) for i in sel]), strict=True):
            out[jobs[i][0]] = _finish(part, dtype)
    if "local" in out:
        sl = out["local"].shape[-1]
        out["local"] = out["local"].view(n, spec.n_local, 3, sl, sl)
    # the batch layout of the CPU paths (B x S x S x 3): views of the NCHW tensors, which the
    # step permutes back without a copy
    return {k: v.movedim(-3, -1) for k, v in out.items()}


def _whole(images: list[Tensor], src2: Tensor) -> dict[str, Tensor]:
    """Images stored at the training size ("full"): B x H x W x 3, the GPU recipe crops them."""
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) != 1:
        raise SeppError(
            f"JPEGs of {len(shapes)} sizes in a batch decoded whole: the dataset is not stored "
            "at the training size; the driver crops on the device for such data (decode spec "
            "with view crops), or decode on the CPU (decode_on=cpu)"
        )
    stacked = torch.stack(images).permute(0, 2, 3, 1)  # U x H x W x 3
    n = len(src2)
    return {"image": stacked[:n], "image2": stacked[src2]}


def decode_batch(
    batch: dict[str, Any],
    device: Any,
    spec: DecodeSpec | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.uint8,
) -> DeviceBatch:
    """A "bytes" batch -> tensors on ``device``: image, image2 (and local) decoded there, every
    other array moved unchanged. With view crops in ``spec``, each view is cropped here from the
    stored image (``generator`` draws the boxes); without, whole images of one size."""
    device = torch.device(device)
    out = DeviceBatch(
        {
            k: torch.from_numpy(np.asarray(v)).to(device, non_blocking=True)
            for k, v in batch.items()
            if k not in BYTES_KEYS
        }
    )
    first = list(batch["image_bytes"])
    n = len(first)
    second = batch.get("image2_bytes")
    second = [None] * n if second is None else list(second)
    other = [i for i, b in enumerate(second) if b is not None]
    images, out.cpu_decoded = decode_images(first + [second[i] for i in other], device)
    index2 = list(range(n))
    for j, i in enumerate(other):
        index2[i] = n + j
    src2 = torch.tensor(index2, dtype=torch.long).to(device, non_blocking=True)
    if spec is None or spec.view1 is None:
        out.update(_whole(images, src2))
        return out
    if generator is None:
        generator = torch.Generator(device=device)
        generator.seed()
    out.update(crop_views(images, src2, spec, generator, dtype))
    return out
