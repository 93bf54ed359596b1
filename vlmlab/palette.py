"""Colour palettes given in CIELAB, rendered as uniform sRGB patches.

A palette is an ordered list of CIELAB (D65, L* in 0..100) colours; colour ``k`` (1-based) is
row ``k`` of its CSV (``L,a,b`` per row, a header row is allowed). ``uw71`` is the UW-71 palette
of the Schloss lab (UW-Madison), shipped with the package.

CIELAB -> sRGB uses the standard formulas: Lab -> XYZ relative to the D65 white
(Xn, Yn, Zn) = (0.95047, 1, 1.08883), XYZ -> linear sRGB by the IEC 61966-2-1 matrix, then the
sRGB transfer curve. A colour outside the sRGB gamut is clipped channel-wise to [0, 1] in linear
RGB; :class:`RenderedColour` says whether it was and by how much (the largest channel excess, and
the CIELAB distance ΔE*ab between the requested colour and the one actually shown).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

BUILTIN_PALETTES = {"uw71": "uw71_lab.csv"}
PATCH_SIZE = 224
D65_WHITE = np.array([0.95047, 1.0, 1.08883])
# XYZ (D65) -> linear sRGB, IEC 61966-2-1
XYZ_TO_LINEAR_RGB = np.array([
    [3.2404542, -1.5371385, -0.4985314],
    [-0.9692660, 1.8760108, 0.0415560],
    [0.0556434, -0.2040259, 1.0572252],
])
_EPSILON = 216 / 24389  # CIE constants of the Lab <-> XYZ cube-root segment
_KAPPA = 24389 / 27


class PaletteError(ValueError):
    """A palette name or file could not be read as CIELAB rows."""


@dataclass(frozen=True)
class RenderedColour:
    """One palette colour as displayed: its CIELAB coordinates, 8-bit sRGB and the gamut clip."""

    index: int  # 1-based position in the palette
    lab: tuple[float, float, float]
    rgb: tuple[int, int, int]
    clipped: bool
    clip_excess: float  # largest amount (linear RGB, 0..1 units) a channel lay outside [0, 1]
    delta_e: float  # CIELAB ΔE*ab between the requested colour and the rendered one


@dataclass(frozen=True)
class Palette:
    """An ordered CIELAB palette and its sRGB rendering."""

    name: str
    lab: np.ndarray  # (N, 3) float

    def __len__(self) -> int:
        return len(self.lab)

    def rendered(self) -> list[RenderedColour]:
        """Every colour as displayed (1-based index, 8-bit sRGB, clipping report)."""
        rgb, excess = lab_to_srgb(self.lab)
        shown = srgb_to_lab(rgb)
        delta_e = np.linalg.norm(shown - self.lab, axis=1)
        rgb8 = np.round(rgb * 255).astype(int)
        return [RenderedColour(i + 1, tuple(float(v) for v in self.lab[i]), tuple(int(v) for v in rgb8[i]),
                               bool(excess[i] > 0), float(excess[i]), float(delta_e[i]))
                for i in range(len(self.lab))]

    def rgb8(self) -> np.ndarray:
        """(N, 3) uint8 sRGB of every colour (clipped into the gamut)."""
        rgb, _ = lab_to_srgb(self.lab)
        return np.round(rgb * 255).astype(np.uint8)

    def patches(self, size: int = PATCH_SIZE) -> list[Image.Image]:
        """One uniform ``size`` x ``size`` RGB patch per colour, in palette order."""
        return [Image.new("RGB", (size, size), tuple(int(v) for v in c)) for c in self.rgb8()]

    def clipped(self) -> list[RenderedColour]:
        """The colours that lie outside the sRGB gamut (rendered clipped)."""
        return [c for c in self.rendered() if c.clipped]


def _srgb_encode(linear: np.ndarray) -> np.ndarray:
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * np.power(linear, 1 / 2.4) - 0.055)


def _srgb_decode(encoded: np.ndarray) -> np.ndarray:
    return np.where(encoded <= 0.04045, encoded / 12.92, np.power((encoded + 0.055) / 1.055, 2.4))


def lab_to_xyz(lab: np.ndarray) -> np.ndarray:
    """CIELAB (D65) -> CIE XYZ with Y of the white = 1; ``lab`` is (..., 3)."""
    lab = np.asarray(lab, np.float64)
    L, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    fy = (L + 16) / 116
    fx = fy + a / 500
    fz = fy - b / 200

    def finv(f: np.ndarray) -> np.ndarray:
        return np.where(f**3 > _EPSILON, f**3, (116 * f - 16) / _KAPPA)

    y = np.where(L > _KAPPA * _EPSILON, fy**3, L / _KAPPA)
    return np.stack([finv(fx), y, finv(fz)], axis=-1) * D65_WHITE


def xyz_to_lab(xyz: np.ndarray) -> np.ndarray:
    """CIE XYZ (white Y = 1) -> CIELAB (D65); ``xyz`` is (..., 3)."""
    t = np.asarray(xyz, np.float64) / D65_WHITE
    f = np.where(t > _EPSILON, np.cbrt(t), (_KAPPA * t + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def lab_to_srgb(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CIELAB (D65) -> sRGB in [0, 1], clipped into the gamut.

    Returns ``(rgb (..., 3), excess (...))`` where ``excess`` is how far the most out-of-gamut
    linear-RGB channel lay outside [0, 1] (0 for colours inside the gamut).
    """
    linear = np.asarray(lab_to_xyz(lab)) @ XYZ_TO_LINEAR_RGB.T
    excess = np.maximum(np.maximum(-linear, linear - 1), 0).max(axis=-1)
    # tolerance for the rounding of published coordinates (white is L=100, a=b=0 to 1e-6)
    excess = np.where(excess < 1e-6, 0.0, excess)
    return _srgb_encode(np.clip(linear, 0, 1)), excess


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] -> CIELAB (D65); ``rgb`` is (..., 3)."""
    linear = _srgb_decode(np.asarray(rgb, np.float64))
    return xyz_to_lab(linear @ np.linalg.inv(XYZ_TO_LINEAR_RGB).T)


def parse_lab_csv(text: str, name: str) -> np.ndarray:
    """``L,a,b`` rows (a non-numeric first row is a header) -> (N, 3) array."""
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    if rows and not _numeric(rows[0]):
        rows = rows[1:]
    if not rows:
        raise PaletteError(f"palette {name} has no colours")
    bad = [i + 1 for i, r in enumerate(rows) if len(r) != 3 or not _numeric(r)]
    if bad:
        raise PaletteError(f"palette {name}: rows {bad[:5]} are not three numbers L,a,b")
    lab = np.array([[float(c) for c in r] for r in rows])
    if (lab[:, 0] < 0).any() or (lab[:, 0] > 100).any():
        raise PaletteError(f"palette {name}: L* must lie in 0..100 (CIELAB); is the file in another colour space?")
    return lab


def _numeric(row: Sequence[str]) -> bool:
    try:
        [float(c) for c in row]
    except ValueError:
        return False
    return True


def load_palette(name_or_path: str | Path = "uw71") -> Palette:
    """A built-in palette by name (``uw71``) or a CSV file of ``L,a,b`` rows in palette order."""
    key = str(name_or_path)
    if key in BUILTIN_PALETTES:
        text = (resources.files("vlmlab") / "data" / BUILTIN_PALETTES[key]).read_text()
        return Palette(key, parse_lab_csv(text, key))
    path = Path(key).expanduser()
    if not path.is_file():
        raise PaletteError(f"no palette {key!r}: use one of {', '.join(BUILTIN_PALETTES)} or a CSV file of L,a,b rows")
    return Palette(path.stem, parse_lab_csv(path.read_text(), str(path)))
