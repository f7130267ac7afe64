"""LLaVA-1.5 image preprocessing on tensors: decode -> pad to square with the mean colour -> resize -> normalise.

LLaVA-1.5 ("image_aspect_ratio: pad") pastes the image centred on a square canvas filled with the CLIP mean
colour (``expand2square``) and then runs the CLIP processor (bicubic resize to 336, scale to [0, 1], normalise).
Padding instead of centre-cropping keeps the whole image -- and its spatial layout -- visible to the model.
Here the same steps run on uint8 tensors with torchvision, so no PIL round trip is needed in the data workers
(JPEGs decode with torchvision; other formats, rare in LLaVA's data, with PIL).

Bad bytes raise :class:`ImageDecodeError` with a reason (empty, corrupt, too_large) instead of crashing: the header
is read first, so a decompression bomb is refused before any decoder allocates its pixels (``MAX_PIXELS``).

Speed (benchmarks/input_bench.py): the image stays in the decoder's HWC (channels-last) layout throughout: the
square canvas is filled row-wise, torchvision's native uint8 bicubic kernel runs fastest on channels-last input,
and one conversion writes the contiguous float (3,S,S) result -- into the sample's slot of the batch's buffer when
given ``out=`` (data/samples.py, SampleBuilder), which saves the batch's stack copy. The numbers are bit-identical to
padding and resizing the CHW tensor with torchvision.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# (mean, std) per RGB channel: each vision backbone declares its own (models/vision); CLIP's is the LLaVA default.
ImageStats = tuple[tuple[float, float, float], tuple[float, float, float]]
DEFAULT_STATS: ImageStats = (CLIP_MEAN, CLIP_STD)

# torchvision 0.29 deprecates its decoders in favour of torchcodec (not a dependency here). They still work; the
# warning would otherwise fire for every image decoded in every data worker. Silenced around our own decode call
# only, so a caller's process keeps its filters.
_TORCHVISION_DECODER_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"


def _torchvision_decode(data: bytes) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TORCHVISION_DECODER_DEPRECATION, category=DeprecationWarning)
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


# Images whose padded square (see expand2square) exceeds this many pixels are refused before any pixel is decoded:
# 64 Mi pixels = an 8192-pixel square, 192 MiB as uint8 (more again in the resize). Real training images (COCO,
# GQA, VG, TextVQA, OCR-VQA, LCS) stay far below; a decompression bomb (a small file declaring 30000x30000) would
# otherwise take gigabytes in every data worker. ImageProcessor(max_pixels=...) changes it.
MAX_PIXELS = 8192 * 8192


class ImageDecodeError(ValueError):
    """The bytes are not a usable image. ``reason``: ``empty``, ``corrupt`` (truncated, undecodable, unknown
    format) or ``too_large`` (see MAX_PIXELS); the data layer counts skipped records by it."""

    def __init__(self, message: str, reason: str = "corrupt"):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        return type(self), (str(self), self.reason)


def check_header(data: bytes, max_pixels: int = MAX_PIXELS) -> str:
    """The image format (PIL's name, e.g. ``JPEG``), read from the header alone; raises ImageDecodeError for
    empty bytes, an unrecognised format, or a size over ``max_pixels`` -- all before any pixel is decoded."""
    if len(data) == 0:
        raise ImageDecodeError("image is empty (0 bytes)", "empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below decides
            with Image.open(io.BytesIO(data)) as img:  # lazy: parses the header only
                fmt, (w, h) = img.format, img.size
    except Image.DecompressionBombError as exc:  # PIL's own limit (2 x 89 M pixels) fires inside open()
        raise ImageDecodeError(f"image too large to decode: {exc}", "too_large") from None
    except Exception as exc:  # noqa: BLE001 -- PIL raises many types for unreadable headers
        raise ImageDecodeError(
            f"cannot decode image ({len(data)} bytes, starts with {data[:8]!r}): {type(exc).__name__}: {exc}"
        ) from None
    side = max(w, h)
    if side * side > max_pixels:
        raise ImageDecodeError(
            f"{w}x{h} image: its padded {side}x{side} square exceeds max_pixels={max_pixels}", "too_large"
        )
    return fmt


def decode_pixels(data: bytes, fmt: str | None = None, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """(3,H,W) uint8. ``fmt``: the format :func:`check_header` returned (checked here when not given)."""
    fmt = fmt or check_header(data, max_pixels)
    tv_error = None
    if fmt == "JPEG":  # the bulk of LLaVA's images: torchvision's libjpeg-turbo path
        try:
            return _torchvision_decode(data)
        except RuntimeError as exc:  # e.g. a truncated file, or a JPEG variant only PIL reads
            tv_error = exc
    # Every other format goes through PIL: torchvision's PNG decoder crashes the whole process (SIGSEGV) on a
    # PNG whose data is shorter than its header promises, where PIL raises.
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = np.array(img.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 -- PIL raises many types for bad files
        raise ImageDecodeError(
            f"cannot decode {fmt} image ({len(data)} bytes, starts with {data[:8]!r}): {tv_error or exc}"
        ) from exc
    return torch.from_numpy(rgb).permute(2, 0, 1)  # HWC memory, like torchvision's decoder


def pad_fill(mean) -> list[int]:
    """The padding colour of LLaVA's "pad" preprocessing: each channel mean times 255, *truncated* (LLaVA's
    `tuple(int(x * 255) for x in image_mean)`; HF's LlavaImageProcessor does the same). Rounding instead would
    give (123, 117, 104) for CLIP's mean where every released checkpoint was trained on (122, 116, 104)."""
    return [int(float(m) * 255) for m in mean]


def expand2square(image: torch.Tensor, fill: list[int]) -> torch.Tensor:
    """Centre a (3,H,W) uint8 image on a square canvas of colour ``fill``, exactly like LLaVA's PIL version
    (the odd pixel of padding goes to the bottom/right, because PIL pastes at offset (side - size) // 2)."""
    _, h, w = image.shape
    if h == w:
        return image
    side = max(h, w)
    left, top = (side - w) // 2, (side - h) // 2
    return F.pad(image, [left, top, side - w - left, side - h - top], fill=fill)


def _square_hwc(image: torch.Tensor, fill_row: torch.Tensor) -> torch.Tensor:
    """(3,H,W) uint8 (any strides) -> (side, side, 3) contiguous canvas, image centred as in ``expand2square``.

    The padding is written as whole rows / column blocks of a pre-built fill row: broadcasting a 3-vector over an
    HWC canvas is ~10x slower than this."""
    _, h, w = image.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    canvas = torch.empty(side, side * 3, dtype=torch.uint8)
    if h < side:
        canvas[:top] = fill_row[: side * 3]
        canvas[top + h :] = fill_row[: side * 3]
    if w < side:
        canvas[:, : left * 3] = fill_row[: left * 3]
        canvas[:, (left + w) * 3 :] = fill_row[: (side - w - left) * 3]
    canvas = canvas.view(side, side, 3)
    canvas[top : top + h, left : left + w] = image.permute(1, 2, 0)
    return canvas


class ImageProcessor:
    """Bytes (any encoded image) or a uint8 (3,H,W) tensor -> normalised float (3,S,S) tensor.

    ``mean``/``std``: the vision backbone's normalisation (``VisionBackbone.stats``, ``image_stats(cfg.model.vision)``)
    -- the data pipeline and the predictor pass it. The default, :data:`DEFAULT_STATS` (CLIP's, LLaVA-1.5's encoder),
    serves direct use (LLaVA preprocessing parity checks, the CLIP-normalised encoder pretraining).
    ``max_pixels``: images whose padded square is larger are refused (ImageDecodeError, reason ``too_large``).
    """

    def __init__(
        self,
        image_size: int = 336,
        mean=DEFAULT_STATS[0],
        std=DEFAULT_STATS[1],
        max_pixels: int = MAX_PIXELS,
    ):
        self.image_size = int(image_size)
        self.max_pixels = int(max_pixels)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.fill = pad_fill(self.mean)
        self._fill_row = torch.tensor(self.fill, dtype=torch.uint8).repeat(256)  # grown on demand
        self._mean = torch.tensor(self.mean).view(3, 1, 1)
        self._std = torch.tensor(self.std).view(3, 1, 1)

    def __call__(
        self, data: bytes | bytearray | memoryview | torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``out``: a contiguous float32 (3,S,S) tensor to write the result into (e.g. a slot of a batch buffer,
        which saves the batch's ``torch.stack`` copy); it is returned. Same numbers either way."""
        if out is not None and (
            out.dtype != torch.float32 or out.shape != (3, self.image_size, self.image_size) or not out.is_contiguous()
        ):
            raise ValueError(
                f"out must be a contiguous float32 (3,{self.image_size},{self.image_size}) tensor, got "
                f"{out.dtype} {tuple(out.shape)}"
            )
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data)
            fmt = check_header(data, self.max_pixels)  # before any decoder allocates the pixels
            image = decode_pixels(data, fmt)
        elif isinstance(data, torch.Tensor):
            if data.dtype != torch.uint8 or data.ndim != 3 or data.shape[0] != 3:
                raise ValueError(f"expected a uint8 (3,H,W) tensor, got {data.dtype} {tuple(data.shape)}")
            image = data
        else:
            raise TypeError(f"expected encoded image bytes or a uint8 tensor, got {type(data).__name__}")
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ImageDecodeError(f"image has no pixels: shape {tuple(image.shape)}", "empty")
        _, h, w = image.shape
        if h != w:
            side = max(h, w)
            if self._fill_row.numel() < side * 3:
                self._fill_row = torch.tensor(self.fill, dtype=torch.uint8).repeat(side)
            image = _square_hwc(image, self._fill_row).permute(2, 0, 1)  # (3,S,S) view of the HWC canvas
        # Resize in uint8, as the CLIP processor does on PIL images, so the result is quantised the same way.
        image = F.resize(
            image, [self.image_size, self.image_size], interpolation=InterpolationMode.BICUBIC, antialias=True
        )
        # The same float ops as F.to_dtype(scale=True) + F.normalize (bit-identical), in one contiguous buffer.
        if out is None:
            out = image.to(torch.float32, memory_format=torch.contiguous_format)
        else:
            out.copy_(image)  # the same uint8 -> float32 conversion as .to(), written into the caller's buffer
        return out.mul_(1.0 / 255).sub_(self._mean).div_(self._std)
