"""LLaVA-1.5 image preprocessing on tensors: decode -> pad to square with the mean colour -> resize -> normalise.

LLaVA-1.5 ("image_aspect_ratio: pad") pastes the image centred on a square canvas filled with the CLIP mean
colour (``expand2square``) and then runs the CLIP processor (bicubic resize to 336, scale to [0, 1], normalise).
Padding instead of centre-cropping keeps the whole image -- and its spatial layout -- visible to the model.
Here the same steps run on uint8 tensors with torchvision, so no PIL round trip is needed in the data workers.
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

# torchvision 0.29 deprecates its decoders in favour of torchcodec (not a dependency here). They still work; the
# warning would otherwise fire for every image decoded in every data worker.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (truncated, corrupt, unsupported format)."""


def _decode(data: bytes) -> torch.Tensor:
    if len(data) == 0:
        raise ImageDecodeError("image is empty (0 bytes)")
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as tv_error:
        # torchvision decodes only jpeg/png/webp/gif; real datasets occasionally hold a bmp or tiff.
        try:
            with Image.open(io.BytesIO(data)) as img:
                rgb = np.asarray(img.convert("RGB")).copy()
            return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
        except Exception:  # noqa: BLE001 -- report the torchvision error, it names the real cause
            raise ImageDecodeError(
                f"cannot decode image ({len(data)} bytes, starts with {data[:8]!r}): {tv_error}"
            ) from tv_error


def expand2square(image: torch.Tensor, fill: list[int]) -> torch.Tensor:
    """Centre a (3,H,W) uint8 image on a square canvas of colour ``fill``, exactly like LLaVA's PIL version
    (the odd pixel of padding goes to the bottom/right, because PIL pastes at offset (side - size) // 2)."""
    _, h, w = image.shape
    if h == w:
        return image
    side = max(h, w)
    left, top = (side - w) // 2, (side - h) // 2
    return F.pad(image, [left, top, side - w - left, side - h - top], fill=fill)


class ImageProcessor:
    """Bytes (any encoded image) or a uint8 (3,H,W) tensor -> normalised float (3,S,S) tensor."""

    def __init__(self, image_size: int = 336, mean=CLIP_MEAN, std=CLIP_STD):
        self.image_size = int(image_size)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        # LLaVA fills with tuple(int(x * 255) for x in mean); rounding differs by at most 1 level. The design
        # doc asks for round(); the difference is far below the resize error and invisible to the model.
        self.fill = [round(255 * m) for m in self.mean]

    def __call__(self, data: bytes | bytearray | memoryview | torch.Tensor) -> torch.Tensor:
        if isinstance(data, (bytes, bytearray, memoryview)):
            image = _decode(bytes(data))
        elif isinstance(data, torch.Tensor):
            if data.dtype != torch.uint8 or data.ndim != 3 or data.shape[0] != 3:
                raise ValueError(f"expected a uint8 (3,H,W) tensor, got {data.dtype} {tuple(data.shape)}")
            image = data
        else:
            raise TypeError(f"expected encoded image bytes or a uint8 tensor, got {type(data).__name__}")
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ImageDecodeError(f"image has no pixels: shape {tuple(image.shape)}")
        image = expand2square(image, self.fill)
        # Resize in uint8, as the CLIP processor does on PIL images, so the result is quantised the same way.
        image = F.resize(image, [self.image_size, self.image_size],
                         interpolation=InterpolationMode.BICUBIC, antialias=True)
        image = F.to_dtype(image, torch.float32, scale=True)
        return F.normalize(image, mean=self.mean, std=self.std)
