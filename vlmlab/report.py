"""One HTML page of a run (a study, the demo, an evaluation): headings, notes, tables and figures, with images
relative to the report (so the folder can be moved or served as is)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; max-width: 100%; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; max-width: 60em; }
.note { color: #444; max-width: 60em; }
"""


@dataclass
class Report:
    """An HTML report being assembled; ``write`` checks that every linked image exists."""

    title: str
    root: Path
    parts: list[str] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)

    def heading(self, text: str) -> None:
        """A section heading."""
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def note(self, text: str) -> None:
        """A paragraph of plain text."""
        self.parts.append(f"<p class='note'>{html.escape(text)}</p>")

    def figure(self, path: str | Path, caption: str = "") -> None:
        """An image (a file under the report's folder) with a caption."""
        path = Path(path)
        rel = path.resolve().relative_to(self.root.resolve()).as_posix()
        self.images.append(path)
        self.parts.append(f"<figure><img src='{html.escape(rel)}' alt='{html.escape(caption or rel)}'>"
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def table(self, frame: pd.DataFrame, columns: Sequence[str] | None = None, digits: int = 3,
              max_rows: int = 200) -> None:
        """A table of ``frame`` (numbers rounded); longer tables are cut with a note."""
        shown = frame[list(columns)] if columns else frame
        cut = len(shown) > max_rows
        shown = shown.head(max_rows)
        self.parts.append(shown.to_html(index=False, float_format=lambda v: f"{v:.{digits}f}", na_rep="–",
                                        border=0, escape=True))
        if cut:
            self.note(f"first {max_rows} of {len(frame)} rows; the CSV holds all of them")

    def write(self, name: str = "report.html") -> Path:
        """Write the page; raises if a linked image is missing (a report must show what it links)."""
        missing = [str(p) for p in self.images if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"report images missing: {missing}")
        body = "\n".join(self.parts)
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>\n{body}\n</body></html>\n")
        out = self.root / name
        out.write_text(page)
        return out
