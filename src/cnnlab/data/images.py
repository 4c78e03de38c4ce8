"""Decoding one image file into a uint8 array, the same way for training folders and for prediction.

Only the raster formats people train on are opened (ALLOWED_FORMATS), for every decode: training
folders, archives, predict, serve and explain. Every Pillow raster mode is brought to L (grayscale) or
RGB: alpha is dropped, palettes and CMYK are converted, 16-bit and 32-bit integer images are scaled (not
clipped) to 8 bits, EXIF orientation is applied, and a multi-frame file (GIF, TIFF, APNG) contributes its
first frame.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cnnlab.errors import CnnlabError

Source = str | Path | bytes  # a file path, or the file's bytes

GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_WIDE_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# EXIF orientations 5-8 rotate by 90 degrees, swapping width and height.
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION = 0x0112


# The formats opened, by content (never by file name). Each is decoded by Pillow's own long-used code or the
# libraries photos pass through every day (libjpeg, libpng, zlib, libtiff, libwebp). Everything else is
# refused before any plugin parses it, as Pillow's security notes advise: EPS and PS would be rendered by
# Ghostscript, and PSD, FITS, PDF and the other plugins are no photo formats. A camera JPEG that carries a
# second picture opens as "MPO": the same JPEG decoder.
ALLOWED_FORMATS = ("BMP", "GIF", "JPEG", "PNG", "TIFF", "WEBP")
# Formats that Pillow cannot read at all, so that its plugins' signatures cannot name them.
_OTHER_SIGNATURES = {b"%PDF": "PDF", b"PK\x03\x04": "ZIP", b"\x1f\x8b": "gzip"}


class ImageError(CnnlabError):
    """A file that is not a readable image."""


def _open(source: Source, name: str) -> Image.Image:
    """Open lazily (header only), treating a decompression bomb as an error before any decoding."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=ALLOWED_FORMATS)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
            raise ImageError(f"{name}: refused, too many pixels ({error})") from None
        except UnidentifiedImageError:
            found = _sniffed_format(source)
            accepted = ", ".join(ALLOWED_FORMATS)
            if found is None:
                raise ImageError(f"{name}: not a recognised image format (accepted: {accepted})") from None
            raise ImageError(f"{name}: refused, a {found} file is not an accepted format ({accepted})") from None
        except OSError as error:
            raise ImageError(f"{name}: cannot read ({error.strerror or error})") from None
        except Exception as error:  # a malformed header can raise anything from inside a format plugin
            raise ImageError(f"{name}: malformed image header ({type(error).__name__})") from None


def _sniffed_format(source: Source) -> str | None:
    """The format a file's first bytes announce, by the signature checks of Pillow's plugins (which read
    only those bytes) and a few others; None when nothing recognises it."""
    try:
        if isinstance(source, bytes):
            prefix = source[:16]
        else:
            with open(source, "rb") as handle:
                prefix = handle.read(16)
    except OSError:
        return None
    Image.init()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # a signature check that trips on a short prefix recognises nothing
            continue
    return next((name for signature, name in _OTHER_SIGNATURES.items() if prefix.startswith(signature)), None)


@dataclass(frozen=True)
class Header:
    format: str | None  # Pillow's format name: "PNG", "JPEG", ...
    grayscale: bool
    height: int  # after EXIF orientation
    width: int


def header(source: Source, name: str) -> Header:
    """What the file's header says, without decoding any pixels."""
    with _open(source, name) as image:
        width, height = image.size
        try:
            orientation = image.getexif().get(_EXIF_ORIENTATION)
        except Exception:  # a broken EXIF block only loses the orientation
            orientation = None
        if orientation in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
        return Header(image.format, image.mode in GRAYSCALE_MODES, height, width)


def read(source: Source, name: str) -> Image.Image:
    """Decode the pixels (first frame) and apply the EXIF orientation."""
    with _open(source, name) as image:
        try:
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            return image
        except Exception as error:  # decoders raise OSError, ValueError, zlib.error, struct.error, ...
            raise ImageError(f"{name}: corrupt or truncated image ({error})") from None


def is_grayscale(image: Image.Image) -> bool:
    return image.mode in GRAYSCALE_MODES


def to_array(image: Image.Image, size: tuple[int, int] | None, channels: int) -> np.ndarray:
    """(H, W, channels) uint8 in L or RGB, brought to `size` = (H, W) unless it is None: scaled, keeping its
    aspect ratio, until it covers `size`, then cropped to it about the centre (a photo is never squashed)."""
    image = _to_mode(image, "L" if channels == 1 else "RGB")
    if size is not None and image.size != (size[1], size[0]):
        height, width = size
        scale = max(height / image.height, width / image.width)
        scaled = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))  # (W, H)
        left, top = (scaled[0] - width) / 2, (scaled[1] - height) / 2
        # Resampling straight from the source onto the crop box: one pass, with Pillow's antialiasing.
        box = (left / scale, top / scale, (left + width) / scale, (top + height) / scale)
        image = image.resize((width, height), Image.Resampling.BILINEAR, box=box)
    array = np.array(image, dtype=np.uint8)  # a writable copy: torch warns on read-only arrays
    return array[..., None] if channels == 1 else array


def decode(source: Source, name: str, size: tuple[int, int] | None, channels: int) -> np.ndarray:
    """Decode a file to (H, W, channels) uint8, resized to `size` = (H, W) unless it is None."""
    return to_array(read(source, name), size, channels)


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    if image.mode in _WIDE_MODES:
        image = _to_8bit(image)
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the direct P -> RGB conversion warns about byte transparency
    if image.mode == mode:
        return image
    return image.convert(mode)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float grayscale to 0..255; Pillow's convert would clip instead."""
    values = np.asarray(image)
    # Integer images from PNG/TIFF hold 16-bit samples, even in Pillow's 32-bit "I" mode.
    wide = image.mode != "F"
    scaled = np.clip(values.astype(np.float64), 0, 65535) / 257.0 if wide else np.clip(values, 0.0, 255.0)
    return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")
