"""``vlmlab cluster``: group a store's images by embedding and draw what the groups look like.

Writes into ``--out``:

- ``clusters.parquet``: ``id``, ``path``, ``cluster`` (-1 = HDBSCAN noise), ``umap_x``, ``umap_y``;
- ``clusters.json``: method, k, cluster sizes, representatives (ids nearest each centroid),
  ``warnings`` (e.g. most points HDBSCAN noise);
- ``umap.png`` and ``umap.html``: the 2-D UMAP map coloured by cluster; the HTML is one
  self-contained file (inline SVG; hovering a point shows its path and cluster);
- ``montage.png``: one row per cluster of the images nearest its centroid;
- ``tile_map.png``: for z/x/y tiles, the clusters laid out by tile x/y (spatial patterns).

UMAP is fitted on at most ``--umap-sample`` rows and the rest are projected with ``transform``,
so a million-row store does not need a million-row neighbour graph in memory.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmlab.config import add_config_arguments, config_from_args
from vlmlab.store import EmbeddingStore

METHODS = ("kmeans", "hdbscan")
# Above this share of noise points HDBSCAN has found little structure: the clusters describe a minority.
NOISE_WARNING_SHARE = 0.5

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterConfig:
    """What ``vlmlab cluster`` does."""

    store: str = field(default="", metadata={"help": "embedding store directory (vlmlab extract)"})
    out: str = field(default="clusters", metadata={"help": "output directory"})
    k: int = field(default=10, metadata={"help": "number of clusters (kmeans)"})
    method: str = field(default="kmeans", metadata={"help": "kmeans | hdbscan"})
    where: str | None = field(default=None, metadata={"help": "metadata filter, e.g. \"source='real'\""})
    min_cluster_size: int = field(default=10, metadata={"help": "smallest HDBSCAN cluster"})
    umap_sample: int = field(default=20000, metadata={"help": "rows UMAP is fitted on; the rest are projected"})
    umap_neighbors: int = field(default=15, metadata={"help": "UMAP n_neighbors"})
    per_cluster: int = field(default=8, metadata={"help": "representative images per cluster in the montage"})
    html_points: int = field(default=20000, metadata={"help": "most points drawn in umap.html (a seeded sample)"})
    seed: int = field(default=0, metadata={"help": "seed of k-means, UMAP and samples"})


# ---------------------------------------------------------------------------- library


def cluster_embeddings(embeddings: np.ndarray, k: int = 10, method: str = "kmeans", seed: int = 0,
                       min_cluster_size: int = 10) -> np.ndarray:
    """Cluster label per row of L2-normalised ``embeddings`` (N, D): ``(N,)`` int64, -1 = noise.

    ``kmeans`` is spherical k-means (faiss, inner product, 5 restarts), the natural choice for
    cosine geometry; ``hdbscan`` (sklearn) finds its own number of clusters and marks outliers -1.
    """
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    if method == "kmeans":
        import faiss

        if not 1 <= k <= len(emb):
            raise ValueError(f"k={k} must be between 1 and the number of rows ({len(emb)}); pass a smaller -k")
        km = faiss.Kmeans(emb.shape[1], k, niter=50, nredo=5, spherical=True, seed=seed,
                          min_points_per_centroid=1, verbose=False)  # small stores are fine: no warning
        # faiss trains on at most 256 rows per centroid (a seeded sample) and then assigns every row.
        km.train(emb)
        _, labels = km.index.search(emb, 1)
        return labels[:, 0].astype(np.int64)
    if method == "hdbscan":
        from sklearn.cluster import HDBSCAN

        return HDBSCAN(min_cluster_size=min_cluster_size, copy=True).fit_predict(emb).astype(np.int64)
    raise ValueError(f"unknown clustering method {method!r}; use one of {', '.join(METHODS)}")


def umap_2d(embeddings: np.ndarray, fit_sample: int = 20000, n_neighbors: int = 15, seed: int = 0) -> np.ndarray:
    """2-D UMAP coordinates (N, 2) float32 of ``embeddings`` (cosine metric).

    Fits on a seeded sample of at most ``fit_sample`` rows and projects the rest with
    ``transform``, which bounds the neighbour graph's memory on large stores.
    """
    import umap

    n = len(embeddings)
    if n < 4:
        # UMAP's spectral init needs a few points; a tiny set is drawn on its first two axes.
        out = np.zeros((n, 2), np.float32)
        out[:, : min(2, embeddings.shape[1])] = embeddings[:, :2]
        return out
    reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, n - 1), metric="cosine", random_state=seed,
                        n_jobs=1, init="spectral" if n > n_neighbors + 1 else "random")
    if n <= fit_sample:
        return reducer.fit_transform(embeddings).astype(np.float32)
    rng = np.random.default_rng(seed)
    fit_rows = np.sort(rng.choice(n, fit_sample, replace=False))
    coords = np.empty((n, 2), np.float32)
    coords[fit_rows] = reducer.fit_transform(embeddings[fit_rows])
    rest = np.setdiff1d(np.arange(n), fit_rows)
    for start in range(0, len(rest), 50000):  # bounded batches keep transform's memory flat
        chunk = rest[start : start + 50000]
        coords[chunk] = reducer.transform(embeddings[chunk])
    return coords


def representatives(embeddings: np.ndarray, labels: np.ndarray, per_cluster: int = 8) -> dict[int, list[int]]:
    """Row indices of the ``per_cluster`` rows nearest each cluster's (normalised) centroid, nearest first.

    Noise (-1) gets no representatives.
    """
    out: dict[int, list[int]] = {}
    for c in np.unique(labels):
        if c < 0:
            continue
        rows = np.flatnonzero(labels == c)
        centroid = embeddings[rows].mean(axis=0)
        centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
        order = np.argsort(-(embeddings[rows] @ centroid), kind="stable")
        out[int(c)] = rows[order[:per_cluster]].tolist()
    return out


def tile_cluster_grid(tile_z: np.ndarray, tile_x: np.ndarray, tile_y: np.ndarray, labels: np.ndarray,
                      max_side: int = 1024) -> dict[str, Any] | None:
    """Clusters laid out by tile x/y at the zoom level holding most tiles.

    Returns ``{"zoom", "x0", "y0", "step", "grid"}`` where ``grid`` (rows = y, cols = x) holds the
    cluster of each tile and -2 where there is none; ``step`` > 1 when the extent was wider than
    ``max_side`` and several tiles share a cell. ``None`` when no row is a tile.
    """
    has = ~(np.isnan(tile_z) | np.isnan(tile_x) | np.isnan(tile_y))
    if not has.any():
        return None
    zooms, counts = np.unique(tile_z[has], return_counts=True)
    zoom = zooms[np.argmax(counts)]
    sel = has & (tile_z == zoom)
    x, y, lab = tile_x[sel].astype(np.int64), tile_y[sel].astype(np.int64), labels[sel]
    x0, y0 = int(x.min()), int(y.min())
    step = max(1, -(-max(int(x.max()) - x0 + 1, int(y.max()) - y0 + 1) // max_side))
    grid = np.full(((int(y.max()) - y0) // step + 1, (int(x.max()) - x0) // step + 1), -2, np.int64)
    grid[(y - y0) // step, (x - x0) // step] = lab
    return {"zoom": int(zoom), "x0": x0, "y0": y0, "step": step, "grid": grid}


# ---------------------------------------------------------------------------- drawing


def _colours(labels: np.ndarray) -> tuple[dict[int, tuple[float, float, float]], list[int]]:
    import matplotlib

    names = sorted(int(c) for c in np.unique(labels))
    cmap = matplotlib.colormaps["tab20" if len(names) > 10 else "tab10"]
    colours = {c: ((0.75, 0.75, 0.75) if c < 0 else tuple(cmap(i % cmap.N)[:3])) for i, c in enumerate(names)}
    return colours, names


def plot_map(coords: np.ndarray, groups: np.ndarray, path: Path, title: str,
             names: dict[int, str] | None = None) -> Path:
    """Scatter of 2-D ``coords`` coloured by integer ``groups`` (legend names from ``names``) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours, order = _colours(groups)
    fig, ax = plt.subplots(figsize=(7, 6))
    size = 12 if len(coords) < 2000 else 2
    for c in order:
        rows = groups == c
        label = (names or {}).get(c, "noise" if c < 0 else f"cluster {c}")
        ax.scatter(coords[rows, 0], coords[rows, 1], s=size, color=colours[c], label=f"{label} ({rows.sum()})")
    ax.set_title(title)
    ax.set_xticks([])  # UMAP coordinates have no units: only the neighbourhoods mean something
    ax.set_yticks([])
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    if len(order) <= 20:
        ax.legend(loc="best", fontsize=7, markerscale=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_map_html(coords: np.ndarray, labels: np.ndarray, paths: list[str], path: Path, title: str,
                   max_points: int = 20000, seed: int = 0) -> Path:
    """A self-contained HTML page: an inline SVG scatter of ``coords``; hovering a point shows its
    path and cluster. At most ``max_points`` (a seeded sample) are drawn, so the page stays small."""
    n = len(coords)
    rows = np.arange(n)
    if n > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    colours, _ = _colours(labels)
    size, pad = 800, 20
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    scale = (size - 2 * pad) / np.maximum(hi - lo, 1e-9)
    circles = []
    for i in rows:
        cx, cy = pad + (coords[i] - lo) * scale
        r, g, b = (int(255 * v) for v in colours[int(labels[i])])
        tip = html.escape(f"{paths[i]}  cluster {int(labels[i])}")
        circles.append(f'<circle cx="{cx:.1f}" cy="{size - cy:.1f}" r="3" fill="rgb({r},{g},{b})">'
                       f"<title>{tip}</title></circle>")
    legend = " ".join(
        f'<span style="color:rgb({",".join(str(int(255 * v)) for v in colours[c])})">&#9679;</span> '
        f"{'noise' if c < 0 else f'cluster {c}'} ({int((labels == c).sum())})"
        for c in sorted(colours))
    note = f"<p>showing {len(rows)} of {n} points (seeded sample)</p>" if len(rows) < n else ""
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}} circle:hover{{stroke:#000;stroke-width:2}}
#tip{{position:fixed;background:#fff;border:1px solid #888;padding:2px 6px;pointer-events:none;display:none}}</style>
</head><body><h3>{html.escape(title)}</h3><p>{legend}</p>{note}
<div id="tip"></div>
<svg width="{size}" height="{size}" style="border:1px solid #ccc">{''.join(circles)}</svg>
<script>
// Show the hovered point's <title> next to the cursor (the browser tooltip is slow to appear).
const tip = document.getElementById("tip");
document.querySelectorAll("circle").forEach(c => {{
  c.addEventListener("mousemove", e => {{ tip.textContent = c.querySelector("title").textContent;
    tip.style.left = (e.clientX + 12) + "px"; tip.style.top = (e.clientY + 12) + "px"; tip.style.display = "block"; }});
  c.addEventListener("mouseleave", () => {{ tip.style.display = "none"; }});
}});
</script></body></html>
"""
    path.write_text(page)
    return path


def plot_tile_map(tiles: dict[str, Any], path: Path) -> Path:
    """PNG of :func:`tile_cluster_grid`'s grid: one cell per tile coloured by cluster, blank where none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = tiles["grid"]
    colours, order = _colours(grid[grid > -2])
    image = np.ones(grid.shape + (3,))
    for c in order:
        image[grid == c] = colours[c]
    h, w = grid.shape
    fig, ax = plt.subplots(figsize=(min(12, 2 + w / 6), min(12, 1.5 + h / 6)))
    ax.imshow(image, interpolation="nearest")
    ax.set_title(f"clusters by tile position (z={tiles['zoom']}, x0={tiles['x0']}, y0={tiles['y0']}, "
                 f"{tiles['step']} tile(s)/cell)", fontsize=8)
    ax.set_xlabel("tile x")
    ax.set_ylabel("tile y")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[c]) for c in order]
    ax.legend(handles, ["noise" if c < 0 else f"cluster {c}" for c in order], fontsize=6,
              loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- the job


def noise_warning(labels: np.ndarray, min_cluster_size: int) -> str | None:
    """A warning when more than ``NOISE_WARNING_SHARE`` of ``labels`` are noise (-1), saying what to try; else None."""
    labels = np.asarray(labels)
    noise = int((labels < 0).sum())
    if not len(labels) or noise / len(labels) <= NOISE_WARNING_SHARE:
        return None
    return (f"HDBSCAN marked {noise} of {len(labels)} points ({noise / len(labels):.0%}) as noise: try a smaller "
            f"min_cluster_size (now {min_cluster_size}) or --method kmeans")


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table[name].to_numpy(zero_copy_only=False).astype(np.float64)


def cluster_store(store: EmbeddingStore, out: str | Path, k: int = 10, method: str = "kmeans",
                  where: str | None = None, min_cluster_size: int = 10, umap_sample: int = 20000,
                  umap_neighbors: int = 15, per_cluster: int = 8, html_points: int = 20000,
                  seed: int = 0) -> dict[str, Any]:
    """Cluster ``store``'s rows (matching ``where``), write the files listed in the module doc to
    ``out`` and return the summary that goes in ``clusters.json`` (plus ``labels``/``coords`` arrays)."""
    from vlmlab.montage import contact_sheet

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids, emb, meta = store.embeddings(where=where)
    if len(ids) == 0:
        raise ValueError(f"no rows in {store.root}{f' match --where {where!r}' if where else ''}; nothing to cluster")
    labels = cluster_embeddings(emb, k=k, method=method, seed=seed, min_cluster_size=min_cluster_size)
    warning = noise_warning(labels, min_cluster_size)
    if warning:
        log.warning("%s", warning)
    coords = umap_2d(emb, fit_sample=umap_sample, n_neighbors=umap_neighbors, seed=seed)
    paths = meta["path"].to_pylist()
    pq.write_table(pa.table({"id": ids, "path": paths, "cluster": labels,
                             "umap_x": coords[:, 0], "umap_y": coords[:, 1]}), out / "clusters.parquet")

    title = f"{store.root.name}: {method} ({len(np.unique(labels[labels >= 0]))} clusters, {len(ids)} images)"
    files = {"parquet": "clusters.parquet", "umap_png": plot_map(coords, labels, out / "umap.png", title).name,
             "umap_html": write_map_html(coords, labels, paths, out / "umap.html", title, html_points, seed).name}

    reps = representatives(emb, labels, per_cluster)
    root = store.source_root
    sheet_paths, captions = [], []
    for c, rows in reps.items():
        for rank, i in enumerate(rows):
            sheet_paths.append(str(root / paths[i]))
            captions.append(f"c{c} #{rank + 1}")
    if sheet_paths:
        contact_sheet(sheet_paths, captions, out / "montage.png", thumb=96, cols=per_cluster,
                      title=f"{per_cluster} images nearest each cluster centroid (one row per cluster)")
        files["montage"] = "montage.png"

    tiles = tile_cluster_grid(_column(meta, "tile_z"), _column(meta, "tile_x"), _column(meta, "tile_y"), labels)
    if tiles is not None:
        files["tile_map"] = plot_tile_map(tiles, out / "tile_map.png").name

    clusters, sizes = np.unique(labels, return_counts=True)
    summary = {
        "store": str(store.root), "where": where, "method": method, "k": k if method == "kmeans" else None,
        "rows": len(ids), "n_clusters": int((clusters >= 0).sum()), "noise": int((labels < 0).sum()),
        "sizes": {str(int(c)): int(s) for c, s in zip(clusters, sizes, strict=True)},
        "representatives": {str(c): [int(ids[i]) for i in rows] for c, rows in reps.items()},
        "umap": {"fit_rows": min(len(ids), umap_sample), "neighbors": umap_neighbors, "metric": "cosine"},
        "tile_map": None if tiles is None else {key: tiles[key] for key in ("zoom", "x0", "y0", "step")},
        "files": files, "seed": seed, "warnings": [warning] if warning else [],
    }
    (out / "clusters.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary | {"labels": labels, "coords": coords, "ids": ids}


def main(argv: list[str] | None = None) -> None:
    """``vlmlab cluster STORE -k 10 --out DIR [--method kmeans|hdbscan] [--where ...]``."""
    parser = argparse.ArgumentParser(prog="vlmlab cluster", description=__doc__.split("\n")[0])
    parser.add_argument("store_dir", metavar="STORE", help=ClusterConfig.__dataclass_fields__["store"].metadata["help"])
    parser.add_argument("-k", "--k", dest="k", default=None, help="number of clusters (kmeans) (default: 10)")
    parser.add_argument("--config", help="YAML file filling ClusterConfig")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    add_config_arguments(parser, ClusterConfig, skip=("store", "k"))
    args = parser.parse_args(argv)
    cfg = config_from_args(ClusterConfig, args, args.config, [*args.overrides, f"store={args.store_dir}"])
    if cfg.method not in METHODS:
        parser.error(f"--method must be one of {', '.join(METHODS)}, not {cfg.method!r}")
    params = {k: v for k, v in asdict(cfg).items() if k != "store"}
    summary = cluster_store(EmbeddingStore.open(cfg.store), **params)
    print(json.dumps({k: summary[k] for k in ("rows", "n_clusters", "noise", "sizes", "files", "warnings")}, indent=1))
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main()
