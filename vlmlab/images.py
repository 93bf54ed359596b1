"""Image files: listing, safe decoding to RGB, content hashes, stable ids, z/x/y tile coordinates.

Decoding is where bad input shows up (truncated files, non-images, decompression bombs, 16-bit
and multi-band TIFFs), so every reader in the product goes through :func:`decode_image`, which
raises :class:`ImageDecodeError` with a reason instead of anything else.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")
# Larger than any tile or inspection photo we expect; PIL's own default guard is ~179 Mpx.
MAX_PIXELS = 100_000_000
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")
_TILE_RE = re.compile(r"(?:^|/)(\d{1,2})/(\d+)/(\d+)\.[A-Za-z]+$")


class ImageDecodeError(ValueError):
    """A file could not be decoded as an image; ``str(exc)`` is the reason recorded in errors.parquet."""


def list_images(root: str | Path) -> Iterator[Path]:
    """Yield image files under ``root`` recursively, sorted, by extension (case-insensitive).

    Only regular files (or links to them): a FIFO or device named ``*.jpg`` would block its reader
    forever, so it is skipped with a warning.
    """
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                path = Path(dirpath) / name
                if not path.is_file():
                    logging.getLogger(__name__).warning("skipping %s: not a regular file", path)
                    continue
                yield path


def content_hash(data: bytes) -> str:
    """Hex SHA-1 of a file's bytes: identifies content independent of path."""
    return hashlib.sha1(data).hexdigest()


def stable_id(relpath: str) -> int:
    """A stable non-negative int64 id for a path relative to the source root (63 bits of SHA-1)."""
    return int.from_bytes(hashlib.sha1(relpath.encode()).digest()[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def tile_xyz(relpath: str) -> tuple[int, int, int] | None:
    """``(z, x, y)`` when the path ends in a slippy-map ``z/x/y.ext`` layout, else None."""
    m = _TILE_RE.search(relpath.replace(os.sep, "/"))
    if not m:
        return None
    z, x, y = (int(g) for g in m.groups())
    if z > 30 or x >= 2**z or y >= 2**z:
        return None
    return z, x, y


def _to_rgb_array(arr: np.ndarray, bands: Sequence[int]) -> np.ndarray:
    """Select three bands and scale any bit depth to uint8 (2nd-98th percentile stretch for >8-bit)."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] >= 3:
        if max(bands) >= arr.shape[-1]:
            raise ImageDecodeError(f"band selection {list(bands)} but the image has {arr.shape[-1]} bands")
        arr = arr[..., list(bands)]
    else:
        raise ImageDecodeError(f"cannot map {arr.shape[-1]} bands to RGB")
    if arr.dtype == np.uint8:
        return arr
    arr = arr.astype(np.float32)
    lo, hi = np.percentile(arr, 2), np.percentile(arr, 98)
    if hi <= lo:
        hi = lo + 1
    return (np.clip((arr - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _decode_tiff(data: bytes) -> np.ndarray:
    import tifffile

    arr = tifffile.imread(io.BytesIO(data))
    if arr.ndim == 3 and arr.shape[0] < min(arr.shape[1:]) and arr.shape[0] <= 16:
        arr = np.moveaxis(arr, 0, -1)  # planar (bands, H, W) -> (H, W, bands)
    return arr


def _pil_open(data: bytes) -> Image.Image:
    """``Image.open`` of the bytes with PIL's own opener.

    ultralytics replaces ``PIL.Image.open`` process-wide on import with one that, on any file PIL
    cannot identify, pip-installs a HEIF plugin and retries (offline: "No module named 'pi_heif'").
    A non-image must fail with our reason, and reading a file must never install packages.
    """
    opener = Image.open
    if getattr(opener, "__module__", "PIL.Image") != "PIL.Image":
        original = getattr(sys.modules.get(opener.__module__), "_image_open", None)
        if callable(original) and getattr(original, "__module__", "") == "PIL.Image":
            opener = original
    return opener(io.BytesIO(data))


def _not_an_image(data: bytes) -> str:
    """The reason for bytes no PIL plugin identifies: what they are not, and how they start
    (PIL's own message names the ``BytesIO`` object, which tells the reader nothing)."""
    return f"not an image PIL can read (first bytes: {data[:16]!r})"


def _without_reprs(message: str) -> str:
    """``message`` with default object reprs (``<_io.BytesIO object at 0x...>``) replaced by "the bytes":
    an address means nothing in an error record."""
    return _OBJECT_REPR.sub("the bytes", message)


def decode_image(data: bytes, bands: Sequence[int] = (0, 1, 2)) -> Image.Image:
    """Decode bytes into an RGB PIL image.

    ``bands`` picks which bands of a multi-band image become R, G, B (e.g. ``(3, 0, 1)`` for a
    NIR false-colour composite of an RGB+NIR tile). Images deeper than 8 bits are stretched
    between their 2nd and 98th percentiles. TIFFs are read with tifffile (any band count or
    bit depth); other formats with PIL. Raises :class:`ImageDecodeError` for empty,
    truncated, non-image or over-large (decompression bomb) input.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = _pil_open(data)
            if img.width * img.height > MAX_PIXELS:
                raise ImageDecodeError(f"decompression bomb: {img.width}x{img.height} exceeds {MAX_PIXELS} pixels")
            if img.format == "TIFF":
                return Image.fromarray(_to_rgb_array(_decode_tiff(data), bands), mode="RGB")
            img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"decompression bomb: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError(_not_an_image(data)) from exc
    except Exception as exc:  # PIL raises many types for bad files; all mean "not a readable image"
        raise ImageDecodeError(f"{type(exc).__name__}: {_without_reprs(str(exc))}") from exc
    if img.mode in ("I;16", "I;16B", "I", "F"):
        return Image.fromarray(_to_rgb_array(np.asarray(img), bands), mode="RGB")
    if len(img.getbands()) > 3 and list(bands) != [0, 1, 2]:
        return Image.fromarray(_to_rgb_array(np.asarray(img), bands), mode="RGB")
    return img.convert("RGB")


def read_image(path: str | Path, bands: Sequence[int] = (0, 1, 2)) -> Image.Image:
    """Read and decode a file with :func:`decode_image`; unreadable files raise ImageDecodeError."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file: {exc}") from exc
    return decode_image(data, bands)
