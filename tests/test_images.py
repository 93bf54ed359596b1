"""vlmlab.images: decode errors say what the bytes are, never an object repr, and decoding never
asks a package manager for anything (ultralytics replaces PIL's ``Image.open`` when imported)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from vlmlab.images import ImageDecodeError, decode_image


def test_non_image_bytes_say_what_they_are_not():
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(b"hello")
    assert str(caught.value) == "not an image PIL can read (first bytes: b'hello')"
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature with nothing behind it
    assert "object at 0x" not in str(caught.value)


def test_decoding_after_ultralytics_is_imported_installs_nothing(monkeypatch):
    import ultralytics.utils.checks
    import ultralytics.utils.patches  # noqa: F401  (it replaces PIL.Image.open on import)

    asked: list[object] = []
    monkeypatch.setattr(ultralytics.utils.checks, "check_requirements", lambda *a, **k: asked.append(a))
    assert Image.open.__module__ != "PIL.Image"  # the patch this guards against is in place
    with pytest.raises(ImageDecodeError, match=r"^not an image PIL can read \(first bytes: b'hello'\)$"):
        decode_image(b"hello")
    assert asked == []
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), (10, 20, 30)).save(buffer, format="PNG")
    assert decode_image(buffer.getvalue()).getpixel((0, 0)) == (10, 20, 30)
