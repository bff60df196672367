"""Image loading and GLM-4V preprocessing.

``load_image`` turns whatever a user hands us (a path, bytes, a file object, a PIL image) into an
RGB PIL image, or raises ``ImageError`` with a message saying what was wrong. Images come from
untrusted clients, so decoding is fenced: a byte limit, a pixel limit checked from the header
before any pixel is decoded, an allow-list of raster formats, and a full decode inside the try so
truncated files fail here rather than later.

``ImageProcessor`` reproduces the official preprocessing bit for bit (GOLDEN_README §4.1):
``resize((S, S), BICUBIC)`` without keeping the aspect ratio, then torchvision's ``ToTensor`` and
``Normalize`` with the CLIP mean/std, in float32.
"""

import hashlib
import io
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from glm4v.errors import ImageError

DEFAULT_MAX_PIXELS = 64_000_000  # a 64 Mpx photo decodes to ~190 MB of RGB; the model sees 1120x1120
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Raster formats Pillow decodes itself. Everything else is refused before a plugin parses it:
# EPS would run Ghostscript, and the long tail of exotic plugins is attack surface for no benefit.
RASTER_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "AVIF")

_EXIF_ORIENTATION = 0x0112


def load_image(source, *, max_pixels=DEFAULT_MAX_PIXELS, max_bytes=DEFAULT_MAX_BYTES):
    """Load an image as an RGB ``PIL.Image.Image``.

    ``source`` is a file path (str or PathLike), bytes-like data, a binary file object, or a PIL
    image. ``max_bytes`` bounds bytes and file objects (a local file path is only bounded by
    ``max_pixels``); ``max_pixels`` bounds width x height of every source and is checked from the
    header, before decoding. Pillow's own decompression-bomb limit (about 179 Mpx) still applies
    above that.

    What users expect to see is what they get:

    * the EXIF orientation of a file is applied, so a phone photo comes out the way every viewer
      shows it, not lying on its side;
    * transparent pixels (alpha channel, or a palette/grey transparency key) are composited onto
      WHITE: converting straight to RGB would expose whatever colour hides under the transparent
      pixels, usually black, which changes the picture (black text on a transparent PNG would
      vanish);
    * 16-bit and 32-bit grey images are scaled to 8 bits instead of clipped to white;
    * an animated GIF/WebP gives its first frame.

    A PIL image passed by the caller is returned unchanged (same object) when it is already RGB,
    and is never EXIF-rotated: the official pipeline calls ``.convert('RGB')`` on the caller's
    image, and results must stay bit-exact with it. Other modes get the conversions above.
    """
    if isinstance(source, Image.Image):
        return _from_pil(source, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        return _from_path(source, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(_check_bytes(source, max_bytes)), max_pixels)
    if hasattr(source, "read"):
        return _decode(io.BytesIO(_read_stream(source, max_bytes)), max_pixels)
    raise ImageError(
        f"unsupported image source of type {type(source).__name__}: "
        "pass a file path, bytes, a binary file object or a PIL image"
    )


def image_digest(image, *, max_pixels=DEFAULT_MAX_PIXELS, max_bytes=DEFAULT_MAX_BYTES):
    """sha256 of the loaded RGB picture: the same pixels from a path, bytes or PIL give the same key."""
    im = load_image(image, max_pixels=max_pixels, max_bytes=max_bytes)
    h = hashlib.sha256(f"{im.mode}:{im.size[0]}x{im.size[1]}:".encode())
    h.update(im.tobytes())
    return h.hexdigest()


class ImageProcessor:
    """Image -> normalised pixel tensor [1, 3, S, S], exactly as the official tokenizer does it."""

    def __init__(self, image_size, mean=CLIP_MEAN, std=CLIP_STD, *,
                 max_pixels=DEFAULT_MAX_PIXELS, max_bytes=DEFAULT_MAX_BYTES):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        if len(mean) != 3 or len(std) != 3 or any(s == 0 for s in std):
            raise ValueError("mean and std need 3 values each, std without zeros")
        self.image_size = image_size
        # float32 tensors built from the python floats, as torchvision's Normalize builds them
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes

    def resize(self, image):
        """The resized RGB PIL image (the uint8 step, before normalisation)."""
        im = load_image(image, max_pixels=self.max_pixels, max_bytes=self.max_bytes)
        return im.resize((self.image_size, self.image_size), Image.BICUBIC)

    def to_tensor(self, resized):
        """uint8 HWC PIL image -> normalised float32 [3, S, S] (ToTensor + Normalize)."""
        x = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1)
        # same ops, same order as torchvision: divide by 255, subtract, then divide (not multiply
        # by a reciprocal), so the result is bit-identical
        return x.float().div(255).sub(self.mean).div(self.std)

    def __call__(self, image):
        return self.to_tensor(self.resize(image))[None]

    def preprocess_batch(self, images):
        images = list(images)
        if not images:
            raise ImageError("preprocess_batch got no images")
        return torch.cat([self(image) for image in images])


# ------------------------------------------------------------------------------------------------
# sources

def _check_bytes(data, max_bytes):
    size = memoryview(data).nbytes
    if size == 0:
        raise ImageError("the image data is empty (0 bytes)")
    if size > max_bytes:
        raise ImageError(f"the image data is {size:,} bytes, above the limit of {max_bytes:,} bytes (max_bytes)")
    return data


def _read_stream(stream, max_bytes):
    # read at most one byte past the limit: a hostile stream may never end
    chunks, size = [], 0
    try:
        while size <= max_bytes:
            chunk = stream.read(min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            if not isinstance(chunk, (bytes, bytearray)):
                raise ImageError(
                    f"the image file object must be opened in binary mode (read() gave {type(chunk).__name__})"
                )
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise ImageError(f"cannot read the image stream: {e}") from e
    if size > max_bytes:
        raise ImageError(f"the image data is more than {max_bytes:,} bytes (max_bytes)")
    return _check_bytes(b"".join(chunks), max_bytes)


def _from_path(path, max_pixels):
    shown = os.fspath(path)
    if not os.path.exists(shown):
        hint = "; URLs are not fetched, download the image first" if "://" in str(shown) else ""
        raise ImageError(f"image file not found: {shown!r}{hint}")
    if not os.path.isfile(shown):
        # a directory, a FIFO, /dev/zero...: nothing a picture lives in
        raise ImageError(f"not a regular file: {shown!r}")
    if os.path.getsize(shown) == 0:
        raise ImageError(f"the image file is empty (0 bytes): {shown!r}")
    try:
        with open(shown, "rb") as f:
            return _decode(f, max_pixels, name=f"image file {shown!r}")
    except OSError as e:
        raise ImageError(f"cannot read image file {shown!r}: {e}") from e


def _from_pil(im, max_pixels):
    _check_size(im.size, max_pixels)
    try:
        im.load()  # an Image.open() result is lazy and may still turn out truncated
    except Exception as e:
        raise ImageError(f"cannot decode the given PIL image: {e}") from e
    if im.mode == "RGB":
        return im
    return _to_rgb(im)


# ------------------------------------------------------------------------------------------------
# decoding

def _decode(fp, max_pixels, name="the image data"):
    with warnings.catch_warnings():
        # the max_pixels check below replaces Pillow's bomb warning; its hard error is caught below.
        # (catch_warnings is process-wide: at worst another thread misses one such warning)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # complaints about a damaged file (corrupt EXIF, oversized tags): the file either decodes
        # or fails with an ImageError, so they would only be log noise an uploader can trigger
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        try:
            im = Image.open(fp, formats=_allowed_formats())
        except Image.DecompressionBombError as e:
            raise ImageError(
                f"{name} was refused as a decompression bomb ({e}); the limit is {max_pixels:,} pixels (max_pixels)"
            ) from e
        except Image.UnidentifiedImageError as e:
            raise ImageError(_unidentified_message(fp, name)) from e
        except Exception as e:
            raise ImageError(f"cannot read the header of {name}: {e}") from e
        _check_size(im.size, max_pixels)
        try:
            # Pillow's plugins signal malformed input with many exception types (OSError,
            # SyntaxError, ValueError, struct.error, EOFError, ...): all mean "cannot decode this"
            im.load()
        except Exception as e:
            raise ImageError(f"{name} is a corrupt or truncated {im.format} image: {e}") from e
        _check_size(im.size, max_pixels)
        return _to_rgb(_apply_exif_orientation(im))


def _allowed_formats():
    Image.init()  # registers the plugins; Image.open raises KeyError on an unregistered name
    return [f for f in RASTER_FORMATS if f in Image.OPEN]


def _unidentified_message(fp, name):
    try:
        fp.seek(0)
        head = fp.read(512)
    except (OSError, ValueError):
        head = b""
    lowered = head.lstrip().lower()
    if lowered.startswith(b"%pdf"):
        what = "a PDF document"
    elif b"<svg" in lowered or lowered.startswith(b"<?xml"):
        what = "an SVG/XML file (vector images are not supported)"
    elif lowered.startswith(b"%!ps"):
        what = "a PostScript/EPS file"
    elif head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"hevc"):
        what = "a HEIC/HEIF image"
    else:
        what = "not a recognised image"
    return f"{name} is {what}; supported formats: {', '.join(_allowed_formats())}"


def _check_size(size, max_pixels):
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"the image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(
            f"the image is {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,} pixels (max_pixels)"
        )


def _apply_exif_orientation(im):
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            return ImageOps.exif_transpose(im)
    except Exception:
        pass  # unreadable EXIF should not cost the user the picture: keep it as stored
    return im


def _to_rgb(im):
    mode = im.mode
    try:
        if mode == "RGB":
            return im
        if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
            return Image.fromarray(_to_uint8(np.asarray(im), mode)).convert("RGB")
        if _has_transparency(im):
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return im.convert("RGB")
    except Exception as e:
        raise ImageError(f"cannot convert an image of mode {mode} to RGB: {e}") from e


def _has_transparency(im):
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        return True
    return im.mode == "P" and im.palette is not None and im.palette.mode.endswith("A")


def _to_uint8(a, mode):
    """High bit-depth grey -> 8 bits, scaling the range instead of clipping it."""
    if mode.startswith("I;16") or (mode == "I" and a.min() >= 0 and a.max() <= 65535):
        return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
    a = np.nan_to_num(a.astype(np.float64))
    if mode == "F" and a.min() >= 0.0 and a.max() <= 1.0:
        return np.round(a * 255).astype(np.uint8)
    # no known range (negative or >16-bit integers, float data): stretch what is there
    lo, hi = a.min(), a.max()
    return np.round((a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)).astype(np.uint8)
