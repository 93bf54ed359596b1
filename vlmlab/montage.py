"""Contact sheets: a grid of thumbnails with a caption under each (search hits, cluster samples)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def contact_sheet(paths: Sequence[str | Path], captions: Sequence[str], out: str | Path, thumb: int = 128,
                  cols: int | None = None, title: str | None = None) -> Path:
    """Write a PNG grid of ``paths`` (each fitted into ``thumb`` x ``thumb``) captioned with ``captions``.

    ``cols`` defaults to about sqrt(n), at most 8. An unreadable image is drawn as a grey cell
    captioned with the error, so one bad file never loses the whole sheet. Returns ``out``.
    """
    from vlmlab.images import ImageDecodeError, read_image

    if len(paths) != len(captions):
        raise ValueError(f"{len(paths)} images but {len(captions)} captions")
    n = max(1, len(paths))
    cols = cols or min(8, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    font = ImageFont.load_default()
    pad, caption_h = 4, 14
    title_h = caption_h + pad if title else 0
    cell_w, cell_h = thumb + pad, thumb + caption_h + pad
    sheet = Image.new("RGB", (cols * cell_w + pad, title_h + rows * cell_h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    for i, (path, caption) in enumerate(zip(paths, captions, strict=True)):
        x = pad + (i % cols) * cell_w
        y = title_h + pad + (i // cols) * cell_h
        try:
            image = read_image(path)
            image.thumbnail((thumb, thumb))
            sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
        except ImageDecodeError as exc:
            draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], fill="#bbbbbb")
            caption = f"{caption} ({exc})"[:40]
        draw.text((x, y + thumb + 1), caption, fill="black", font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
