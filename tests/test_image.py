import io
import json
import random
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

from glm4v.errors import ImageError
from glm4v.image import CLIP_MEAN, CLIP_STD, ImageProcessor, image_digest, load_image
from tests.serving import budget

FIXTURES = Path(__file__).parent / "fixtures"
IMAGES = sorted((FIXTURES / "images").glob("*.png"))


def case_images(case_dir):
    """Image files of a golden case, in batch order (case 04 is a batch of two conversations)."""
    conversation = json.loads((case_dir / "case.json").read_text(encoding="utf-8"))["conversation"]
    conversations = conversation if isinstance(conversation[0], list) else [conversation]
    return [FIXTURES / "images" / m["image"] for conv in conversations for m in conv if "image" in m]


IMAGE_CASES = [p for p in sorted((FIXTURES / "cases").iterdir()) if p.is_dir() and case_images(p)]


def encode(im, fmt, **kwargs):
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise(w, h, mode="RGB", seed=0):
    channels = len(Image.new(mode, (1, 1)).getbands())
    a = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if channels == 1 else a, mode)


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width, height):
    """A PNG header announcing width x height 1-bit pixels, followed by a few rows: a few hundred bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = (b"\x00" * (1 + (width + 7) // 8)) * 16
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows, 9))
            + png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def processor():
    return ImageProcessor(112)


# -- golden parity --------------------------------------------------------------------------------

@pytest.mark.parametrize("case_dir", IMAGE_CASES, ids=lambda p: p.name)
def test_golden_pixels_bit_exact(processor, case_dir):
    tensors = load_file(case_dir / "tensors.safetensors")
    files = case_images(case_dir)
    resized = torch.stack([torch.from_numpy(np.array(processor.resize(f))) for f in files])
    assert torch.equal(resized, tensors["resized_uint8_hwc"])
    pixels = processor.preprocess_batch(files)
    assert pixels.dtype == torch.float32
    assert torch.equal(pixels, tensors["pixel_values"])


@pytest.mark.parametrize("path", IMAGES, ids=lambda p: p.name)
def test_path_bytes_pil_identical(processor, path):
    data = path.read_bytes()
    with Image.open(path) as im:
        pil = im.convert("RGB")  # what the official demos pass
    sources = [path, str(path), data, bytearray(data), memoryview(data), io.BytesIO(data), pil]
    tensors = [processor(s) for s in sources]
    assert tensors[0].shape == (1, 3, 112, 112)
    for t in tensors[1:]:
        assert torch.equal(t, tensors[0])
    assert len({image_digest(s) for s in (path, data, pil)}) == 1


def test_digest_distinguishes_images():
    assert len({image_digest(p) for p in IMAGES}) == len(IMAGES)


def test_normalisation_matches_torchvision_formula(processor):
    # torchvision: ToTensor = float().div(255); Normalize = sub_(mean).div_(std) with float32 tensors
    resized = processor.resize(IMAGES[0])
    x = torch.from_numpy(np.array(resized)).permute(2, 0, 1).contiguous().float().div(255)
    mean = torch.as_tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    assert torch.equal(processor(IMAGES[0])[0], x.sub_(mean).div_(std))


def test_pil_rgb_is_untouched_and_other_modes_are_not_mutated():
    rgb = noise(8, 8)
    assert load_image(rgb) is rgb
    grey = noise(8, 8, "L")
    before = grey.tobytes()
    out = load_image(grey)
    assert out.mode == "RGB" and grey.mode == "L" and grey.tobytes() == before


# -- limits and hostile input ---------------------------------------------------------------------

@pytest.mark.parametrize("size", [(30000, 30000), (10000, 10000), (9000, 9000)],
                         ids=["pillow-bomb-error", "pillow-bomb-warning", "below-pillow-limit"])
def test_decompression_bomb_refused_fast(size):
    data = png_bomb(*size)
    assert len(data) < 8000
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's bomb warning must not leak out either
        with pytest.raises(ImageError, match="64,000,000"):
            load_image(data)
    assert time.perf_counter() - start < 2.0


def test_custom_pixel_limit_applies_to_every_source(tmp_path):
    im = noise(100, 100)
    path = tmp_path / "a.png"
    im.save(path)
    for source in (path, path.read_bytes(), im):
        with pytest.raises(ImageError, match="5,000"):
            load_image(source, max_pixels=5000)
        assert load_image(source, max_pixels=10_000).size == (100, 100)


def test_byte_limit():
    data = encode(noise(32, 32), "PNG")
    with pytest.raises(ImageError, match=f"{100:,} bytes"):
        load_image(data, max_bytes=100)
    with pytest.raises(ImageError, match="max_bytes"):
        load_image(io.BytesIO(data), max_bytes=100)

    class Endless:
        def read(self, n=-1):
            return b"\0" * (n if n > 0 else 1 << 20)

    with pytest.raises(ImageError, match="max_bytes"):
        load_image(Endless(), max_bytes=1 << 20)


@pytest.mark.parametrize("source", [b"", bytearray(), memoryview(b""), io.BytesIO()],
                         ids=["bytes", "bytearray", "memoryview", "stream"])
def test_empty_input(source):
    with pytest.raises(ImageError, match="empty"):
        load_image(source)


def test_empty_file_missing_file_and_directory(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(empty)
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="URL"):
        load_image("https://example.com/cat.png")
    with pytest.raises(ImageError, match="regular file"):
        load_image(tmp_path)


def test_wrong_source_types():
    for source in (None, 3, 1.5, ["a.png"], np.zeros((4, 4, 3), np.uint8), io.StringIO("text")):
        with pytest.raises(ImageError):
            load_image(source)


def test_random_bytes():
    rng = random.Random(0)
    for n in (1, 7, 100, 5000):
        with pytest.raises(ImageError, match="not a recognised image"):
            load_image(rng.randbytes(n))


@pytest.mark.parametrize("data,what", [
    (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
     b'<rect width="10" height="10" fill="red"/></svg>', "SVG"),
    (b'<svg xmlns="http://www.w3.org/2000/svg"><circle r="4"/></svg>', "SVG"),
    (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\n"
     b"trailer<</Root 1 0 R>>\n%%EOF\n", "PDF"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "PostScript"),
], ids=["svg-xml", "svg", "pdf", "eps"])
def test_vector_and_document_formats_refused(data, what):
    with pytest.raises(ImageError, match=what):
        load_image(data)


@pytest.mark.parametrize("fmt", ["ICO", "PCX", "TGA"])
def test_formats_outside_the_allow_list_refused(fmt):
    with pytest.raises(ImageError, match="supported formats"):
        load_image(encode(noise(16, 16), fmt))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP"])
def test_truncated_files(tmp_path, fmt):
    data = encode(noise(64, 64), fmt)
    assert load_image(data).size == (64, 64)
    with pytest.raises(ImageError):
        load_image(data[: len(data) // 2])
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError):
        load_image(path)


def test_lazily_opened_truncated_pil_image():
    data = encode(noise(64, 64), "PNG")
    im = Image.open(io.BytesIO(data[: len(data) // 2]))  # header parses, pixels are missing
    with pytest.raises(ImageError):
        load_image(im)


# -- mode conversions -----------------------------------------------------------------------------

def pixel(source, xy=(0, 0)):
    return load_image(source).getpixel(xy)


def test_16bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "I;16"
    out = load_image(data)
    assert [out.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (4, 4, 4), (128, 128, 128), (255, 255, 255)]
    as_int32 = Image.fromarray(values.astype(np.int32))
    assert as_int32.mode == "I"
    assert load_image(as_int32).tobytes() == out.tobytes()


def test_16bit_rgb_png():
    # Pillow cannot write 48-bit RGB PNGs: build one (2x1, big-endian 16-bit samples) by hand
    rows = b"\x00" + struct.pack(">6H", 65535, 0, 0, 0, 32896, 65535)
    ihdr = struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))
    out = load_image(data)
    assert out.mode == "RGB" and [out.getpixel((x, 0)) for x in range(2)] == [(255, 0, 0), (0, 128, 255)]


def test_float_grey():
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    out = load_image(Image.fromarray(values, "F"))
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_cmyk_jpeg():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    r, g, b = pixel(data, (8, 8))
    assert r > 240 and g < 15 and b < 15


def test_palette_with_transparency_on_white():
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black (transparent), 1 red
    im.putpixel((1, 1), 1)
    data = encode(im, "PNG", transparency=0)
    out = load_image(data)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (255, 0, 0)


def test_alpha_composited_on_white():
    la = Image.new("LA", (3, 1))
    la.putdata([(0, 0), (0, 255), (0, 128)])
    out = load_image(encode(la, "PNG"))
    assert [out.getpixel((x, 0)) for x in range(3)] == [(255, 255, 255), (0, 0, 0), (127, 127, 127)]
    rgba = Image.new("RGBA", (2, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255)])
    out = load_image(rgba)  # PIL input of another mode gets the same treatment
    assert [out.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (0, 0, 255)]


@pytest.mark.parametrize("mode,value,expected", [
    ("1", 1, (255, 255, 255)),
    ("L", 77, (77, 77, 77)),
    ("P", 3, (30, 60, 90)),
])
def test_simple_modes(mode, value, expected):
    im = Image.new(mode, (4, 4), value)
    if mode == "P":
        im.putpalette([0, 0, 0] * 3 + [30, 60, 90] + [0] * 756)
    assert pixel(encode(im, "PNG")) == expected
    assert pixel(im) == expected


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_gives_first_frame(fmt):
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
    with Image.open(io.BytesIO(data)) as im:
        assert im.n_frames == 2
    assert pixel(data, (4, 4)) == (255, 0, 0)


@pytest.mark.parametrize("size", [(1, 1), (10000, 3), (3, 10000)])
def test_extreme_aspect_ratios(processor, size):
    out = processor(encode(noise(*size), "PNG"))
    assert out.shape == (1, 3, 112, 112) and torch.isfinite(out).all()


def test_exif_orientation_applied():
    # stored landscape: left half red, right half blue; orientation 6 = "rotate 90 degrees clockwise to view"
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(im, "JPEG", quality=95, exif=exif.tobytes())
    out = load_image(data)
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 50  # the left edge became the top
    assert bottom[2] > 200 and bottom[0] < 50
    # a caller's PIL image is taken as the caller has it (official pipeline parity)
    with Image.open(io.BytesIO(data)) as raw:
        assert load_image(raw.convert("RGB")).size == (40, 20)


def test_processor_validation():
    with pytest.raises(ValueError):
        ImageProcessor(0)
    with pytest.raises(ValueError):
        ImageProcessor(16, std=(1.0, 0.0, 1.0))
    with pytest.raises(ImageError):
        ImageProcessor(16).preprocess_batch([])


# -- property: nothing but ImageError escapes -----------------------------------------------------

SEEDS = {
    fmt: encode(noise(12, 10, mode, seed=1), fmt, **kwargs)
    for fmt, mode, kwargs in [
        ("PNG", "RGB", {}), ("JPEG", "RGB", {"quality": 80}), ("GIF", "P", {}), ("WEBP", "RGBA", {}),
        ("BMP", "RGB", {}), ("TIFF", "RGB", {"compression": "tiff_lzw"}),
    ]
}
SMALL = ImageProcessor(16, max_pixels=1_000_000, max_bytes=1 << 16)


def check_only_image_error(data) -> bool:
    """True if the bytes decoded to a valid tensor, False if refused with ImageError; anything else fails."""
    try:
        out = SMALL(data)
    except ImageError:
        return False
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
    return True


@st.composite
def mutated(draw):
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
    return bytes(data)


@pytest.mark.parametrize("name,strategy", [("arbitrary bytes", st.binary(max_size=2048)), ("mutated images", mutated())],
                         ids=["arbitrary", "mutated"])
def test_property_only_image_error_escapes(request, capsys, name, strategy):
    # 200 examples each in CI; GLM4V_FUZZ_EXAMPLES=N or --runslow (5,000) for a longer run
    examples = budget(request.config, "GLM4V_FUZZ_EXAMPLES", 200, 5000)
    outcomes = {"refused": 0, "decoded": 0}

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(strategy)
    def check(data):
        outcomes["decoded" if check_only_image_error(data) else "refused"] += 1

    check()
    with capsys.disabled():
        print(f"\n[image fuzz: {name}] {sum(outcomes.values())} inputs: {outcomes['refused']} refused with "
              f"ImageError, {outcomes['decoded']} decoded")
