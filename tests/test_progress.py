"""One progress helper for every long step: count, percent, items/s and an ETA, as lines in a log."""

from __future__ import annotations

import io
import re

from vlmlab.progress import Progress, collect_rows


def test_a_log_gets_steady_lines_with_rate_and_eta():
    stream = io.StringIO()
    with Progress(10, "extract", "images", interval_s=0.0, stream=stream) as progress:
        for _ in range(4):
            progress.update()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5  # one per update (interval 0) and the last at the end
    assert re.fullmatch(r"extract: 4/10 images \(40%\) [\d.]+ images/s, ETA \d\d:\d\d", lines[-1])


def test_collect_rows_counts_a_ray_dataset_as_it_streams(ray_local, capsys):
    import ray

    rows = [{"parent": f"img{i // 3}", "k": i} for i in range(12)]  # 4 source images, 3 rows each
    out = collect_rows(ray.data.from_items(rows), 4, "corpus build", "images", key="parent")
    assert sorted(r["k"] for r in out) == list(range(12))
    assert "corpus build: 4/4 images (100%)" in capsys.readouterr().err
