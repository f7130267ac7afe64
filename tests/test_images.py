"""ImageProcessor against an independent PIL implementation of LLaVA-1.5's expand2square + CLIP preprocessing."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_sp.data.images import CLIP_MEAN, CLIP_STD, ImageDecodeError, ImageProcessor

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29

MEAN, STD = np.array(CLIP_MEAN), np.array(CLIP_STD)
FILL = tuple(int(x * 255) for x in CLIP_MEAN)  # LLaVA's train.py/mm_utils: the mean colour, truncated


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


def pil_reference(data: bytes, size: int) -> torch.Tensor:
    """LLaVA: expand2square(img, mean colour) -> CLIP processor (bicubic resize, /255, normalise)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), FILL)
    square.paste(img, ((side - w) // 2, (side - h) // 2))
    arr = np.asarray(square.resize((size, size), Image.BICUBIC)).astype(np.float64) / 255
    return torch.from_numpy((arr - MEAN) / STD).permute(2, 0, 1).float()


def scene(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, (3 * xx + yy) % 256], -1).astype(np.uint8)
    arr[h // 4 : h // 2, w // 5 : w // 2] = (250, 20, 20)  # sharp edges stress the resampling kernels
    return arr


@pytest.mark.parametrize("h,w,size", [(90, 160, 336), (160, 90, 336), (300, 200, 64), (50, 50, 64)])
def test_matches_pil_reference(h, w, size):
    data = encode(scene(h, w))
    out = ImageProcessor(size)(data)
    ref = pil_reference(data, size)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    diff = (out - ref).abs()
    # One uint8 level is 1/255/std ~= 0.015 after normalisation: allow rounding, not a shifted or blurred image.
    assert diff.mean() < 0.005 and diff.max() < 0.05


@pytest.mark.parametrize("h,w", [(24, 40), (25, 40), (40, 23)])
def test_padding_geometry_exact(h, w):
    """With S equal to the long side there is no resampling: every pixel is either image or mean colour."""
    colour = np.array([10, 200, 30], dtype=np.uint8)
    side = max(h, w)
    out = ImageProcessor(side)(torch.from_numpy(np.broadcast_to(colour, (h, w, 3)).copy()).permute(2, 0, 1))
    top, left = (side - h) // 2, (side - w) // 2  # PIL paste offset: the odd pixel goes bottom/right
    expected = np.broadcast_to(np.array(FILL, dtype=np.float64), (side, side, 3)).copy()
    expected[top : top + h, left : left + w] = colour
    expected = torch.from_numpy((expected / 255 - MEAN) / STD).permute(2, 0, 1).float()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_padding_colour_is_llavas_and_hf_llava_image_processors():
    """LLaVA truncates (122, 116, 104), not rounds (123, 117, 104): our loader, HF's LlavaImageProcessor (what our
    HF export ships) and LLaVA itself pad with the same colour."""
    from transformers import LlavaImageProcessor

    assert FILL == (122, 116, 104)
    h, w = 20, 48  # wide: rows above and below are padding; the side stays 48, so no resampling touches them
    image = np.full((h, w, 3), 255, dtype=np.uint8)
    ours = ImageProcessor(w)(torch.from_numpy(image).permute(2, 0, 1))
    hf = LlavaImageProcessor(
        do_pad=True,
        size={"shortest_edge": w},
        crop_size={"height": w, "width": w},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        resample=3,
    )
    theirs = torch.from_numpy(hf(Image.fromarray(image), return_tensors="np")["pixel_values"][0])
    expected_pad = torch.tensor([(f / 255 - m) / s for f, m, s in zip(FILL, CLIP_MEAN, CLIP_STD)]).view(3, 1)
    for pixels in (ours, theirs):
        torch.testing.assert_close(pixels[:, 0, :], expected_pad.expand(3, w), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_bytes_and_tensor_agree_and_grayscale_becomes_rgb():
    arr = scene(30, 50)
    proc = ImageProcessor(32)
    torch.testing.assert_close(proc(encode(arr)), proc(torch.from_numpy(arr).permute(2, 0, 1).contiguous()))
    gray = proc(encode(arr[..., 0]))
    assert gray.shape == (3, 32, 32)
    torch.testing.assert_close(gray, pil_reference(encode(arr[..., 0]), 32), atol=0.05, rtol=0)
    jpeg = proc(encode(arr, "JPEG"))  # a lossy format decodes too
    assert jpeg.shape == (3, 32, 32)
    # torchvision has no BMP decoder; the PIL fallback must give the same pixels as PNG.
    torch.testing.assert_close(proc(encode(arr, "BMP")), proc(encode(arr)))


def test_bad_input_raises_clear_errors():
    proc = ImageProcessor(32)
    with pytest.raises(ImageDecodeError, match="0 bytes"):
        proc(b"")
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        proc(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageDecodeError):
        proc(encode(scene(40, 40), "JPEG")[:200])  # truncated JPEG
    with pytest.raises(ValueError, match="uint8"):
        proc(torch.zeros(3, 8, 8))
    with pytest.raises(TypeError):
        proc("image.jpg")


@pytest.mark.parametrize("h,w", [(30, 50), (50, 30), (32, 32)])
def test_out_buffer_gets_the_same_numbers(h, w):
    """``out=`` (a slot of a batch buffer, see SampleBuilder) changes where the result goes, not what it is."""
    proc, data = ImageProcessor(32), encode(scene(h, w), "JPEG")
    buffer = torch.full((2, 3, 32, 32), float("nan"))
    slot = buffer[1]
    assert proc(data, out=slot) is slot and torch.equal(buffer[1], proc(data))
    assert torch.isnan(buffer[0]).all()  # nothing written outside the slot
    tensor = torch.from_numpy(scene(h, w)).permute(2, 0, 1)
    assert torch.equal(proc(tensor, out=buffer[0]), proc(tensor))


def test_out_buffer_must_fit():
    proc, data = ImageProcessor(32), encode(scene(20, 20))
    for bad in (torch.empty(3, 32, 31), torch.empty(3, 32, 32, dtype=torch.float64), torch.empty(3, 32, 64)[..., ::2]):
        with pytest.raises(ValueError, match="out must be"):
            proc(data, out=bad)
