"""``vlmlab compare``: how far apart are two sets of images (real vs synthetic, or any two)?

All figures are computed on the stores' L2-normalised image embeddings, A the reference set:

- ``mean_cosine``: cosine of the two mean embeddings (1 = same centre);
- ``frechet_distance``: the FID formula ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2)``
  on the embeddings. With fewer rows than dimensions a sample covariance is singular, so then
  (``--covariance auto``) both covariances are Ledoit-Wolf shrinkage estimates; the report says
  which estimator was used, and distances are only comparable under the same one;
- ``mmd2``: unbiased squared MMD with an RBF kernel whose width is the median pairwise distance
  of the pooled sample, and ``mmd_p_value`` from a seeded permutation test;
- ``precision`` / ``recall``: k-NN manifold coverage (Kynkaanniemi et al. 2019): the share of B
  inside A's k-NN balls, and of A inside B's;
- ``cross_duplicates``: pairs (A row, B row) with cosine >= ``--duplicate-threshold``;
- a joint UMAP plot coloured by set and a histogram of nearest-neighbour cosines.

Writes ``report.json``, ``joint_umap.png`` and ``nn_cosine.png`` into ``--out``. The same store
may be given twice with two ``--where`` filters (one store holding real and synthetic rows).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmlab.config import add_config_arguments, config_from_args
from vlmlab.store import EmbeddingStore

COVARIANCES = ("auto", "sample", "ledoit_wolf")


@dataclass(frozen=True)
class CompareConfig:
    """What ``vlmlab compare`` does."""

    store_a: str = field(default="", metadata={"help": "reference store (e.g. real images)"})
    store_b: str = field(default="", metadata={"help": "store compared against A (e.g. synthetic); may equal A"})
    out: str = field(default="compare", metadata={"help": "output directory"})
    where_a: str | None = field(default=None, metadata={"help": "metadata filter on A's rows"})
    where_b: str | None = field(default=None, metadata={"help": "metadata filter on B's rows"})
    covariance: str = field(default="auto", metadata={
        "help": "Frechet covariance estimator: auto (Ledoit-Wolf when a set has no more rows than dims) "
                "| sample | ledoit_wolf"})
    permutations: int = field(default=500, metadata={"help": "MMD permutation-test resamples"})
    max_samples: int = field(default=2000, metadata={"help": "rows per set used by MMD and precision/recall"})
    pr_k: int = field(default=3, metadata={"help": "k of the k-NN balls in precision/recall"})
    duplicate_threshold: float = field(default=0.95, metadata={"help": "cosine at or above which A/B rows pair up"})
    max_pairs: int = field(default=1000, metadata={"help": "most duplicate pairs listed in report.json"})
    umap_sample: int = field(default=20000, metadata={"help": "rows the joint UMAP is fitted on"})
    seed: int = field(default=0, metadata={"help": "seed of the subsamples, permutations and UMAP"})


# ---------------------------------------------------------------------------- figures on arrays


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of the mean embeddings of ``a`` (N, D) and ``b`` (M, D)."""
    ma, mb = a.mean(axis=0), b.mean(axis=0)
    return float(ma @ mb / max(float(np.linalg.norm(ma) * np.linalg.norm(mb)), 1e-12))


def _covariance(x: np.ndarray, estimator: str) -> np.ndarray:
    if estimator == "sample":
        return np.cov(x, rowvar=False)
    from sklearn.covariance import ledoit_wolf

    return ledoit_wolf(x)[0]


def frechet_distance(a: np.ndarray, b: np.ndarray, covariance: str = "auto") -> tuple[float, str]:
    """Frechet distance between Gaussians fitted to ``a`` and ``b``; returns ``(distance, estimator)``.

    ``covariance="auto"`` uses Ledoit-Wolf shrinkage when either set has no more rows than
    dimensions (the sample covariance is then singular and the square root unstable), else the
    sample covariance.
    """
    from scipy import linalg

    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {', '.join(COVARIANCES)}, not {covariance!r}")
    a, b = a.astype(np.float64), b.astype(np.float64)
    if min(len(a), len(b)) < 2:
        raise ValueError("the Frechet distance needs at least 2 rows in each set")
    estimator = covariance
    if estimator == "auto":
        estimator = "ledoit_wolf" if min(len(a), len(b)) <= a.shape[1] else "sample"
    sa, sb = _covariance(a, estimator), _covariance(b, estimator)
    diff = a.mean(axis=0) - b.mean(axis=0)
    covmean = linalg.sqrtm(sa @ sb)
    if not np.isfinite(covmean).all():
        # As in the FID reference code: a near-singular product gets a small ridge.
        eps = 1e-6 * np.eye(len(sa))
        covmean = linalg.sqrtm((sa + eps) @ (sb + eps))
    covmean = np.real(covmean)  # numerical noise leaves a tiny imaginary part
    value = float(diff @ diff + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean))
    return max(value, 0.0), estimator


def _subsample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= n else x[np.sort(rng.choice(len(x), n, replace=False))]


def _sq_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return np.maximum(d, 0)


def mmd_permutation_test(a: np.ndarray, b: np.ndarray, permutations: int = 500, seed: int = 0
                         ) -> dict[str, float | int]:
    """Unbiased squared MMD (RBF kernel, median-distance bandwidth) and its permutation p-value.

    The kernel matrix of the pooled rows is computed once; each permutation only re-sums it.
    p = (1 + #permuted >= observed) / (1 + permutations), so it is never 0.
    """
    n, m = len(a), len(b)
    if n < 2 or m < 2:
        raise ValueError("MMD needs at least 2 rows in each set")
    pooled = np.concatenate([a, b]).astype(np.float64)
    d2 = _sq_distances(pooled, pooled)
    off_diagonal = np.delete(d2.ravel(), np.arange(0, d2.size, len(d2) + 1))
    bandwidth = float(np.sqrt(np.median(off_diagonal)))
    kernel = np.exp(-d2 / (2 * max(bandwidth, 1e-12) ** 2))
    np.fill_diagonal(kernel, 0.0)  # unbiased estimate: no self-similarities
    total, row_sums = kernel.sum(), kernel.sum(axis=1)

    def mmd2(in_a: np.ndarray) -> np.ndarray:
        # in_a: (P, n+m) 0/1 rows. s'Ks, s'K(1-s) and (1-s)'K(1-s) from one product.
        saa = ((in_a @ kernel) * in_a).sum(axis=1)
        sab = in_a @ row_sums - saa
        sbb = total - 2 * (in_a @ row_sums) + saa
        return saa / (n * (n - 1)) + sbb / (m * (m - 1)) - 2 * sab / (n * m)

    observed = float(mmd2(np.r_[np.ones(n), np.zeros(m)][None, :])[0])
    rng = np.random.default_rng(seed)
    null = []
    for start in range(0, permutations, 100):  # batches bound the (P, n+m) product's memory
        count = min(100, permutations - start)
        in_a = np.zeros((count, n + m))
        for row in in_a:
            row[rng.permutation(n + m)[:n]] = 1.0
        null.append(mmd2(in_a))
    null_arr = np.concatenate(null) if null else np.zeros(0)
    p_value = (1 + int((null_arr >= observed).sum())) / (1 + len(null_arr))
    return {"mmd2": observed, "p_value": float(p_value), "bandwidth": bandwidth, "permutations": len(null_arr)}


def _kth_neighbour_radii(x: np.ndarray, k: int) -> np.ndarray:
    d2 = _sq_distances(x, x)
    np.fill_diagonal(d2, np.inf)
    k = min(k, len(x) - 1)
    return np.sqrt(np.partition(d2, k - 1, axis=1)[:, k - 1])


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int = 2048) -> float:
    inside = np.zeros(len(points), bool)
    for start in range(0, len(points), chunk):
        d = np.sqrt(_sq_distances(points[start : start + chunk], centres))
        inside[start : start + chunk] = (d <= radii[None, :]).any(axis=1)
    return float(inside.mean())


def precision_recall(a: np.ndarray, b: np.ndarray, k: int = 3) -> dict[str, float]:
    """k-NN manifold precision and recall of ``b`` against reference ``a`` (Kynkaanniemi et al. 2019).

    precision: share of ``b`` rows within the k-th-neighbour radius of some ``a`` row (B is
    realistic); recall: share of ``a`` rows within that of some ``b`` row (B covers A).
    """
    a, b = a.astype(np.float64), b.astype(np.float64)
    return {"precision": _coverage(b, a, _kth_neighbour_radii(a, k)),
            "recall": _coverage(a, b, _kth_neighbour_radii(b, k)), "k": k}


def nearest_cosines(queries: np.ndarray, reference: np.ndarray,
                    exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, ``(cosine, row index)`` of its nearest ``reference`` row (exact faiss search).

    ``exclude_self`` skips the identical row when queries and reference are the same set.
    """
    import faiss

    index = faiss.IndexFlatIP(reference.shape[1])
    index.add(np.ascontiguousarray(reference, dtype=np.float32))
    k = 2 if exclude_self else 1
    sims, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    if exclude_self:
        self_first = rows[:, 0] == np.arange(len(queries))
        sims = np.where(self_first, sims[:, 1], sims[:, 0])
        rows = np.where(self_first, rows[:, 1], rows[:, 0])
        return sims, rows
    return sims[:, 0], rows[:, 0]


def cross_duplicates(a: np.ndarray, b: np.ndarray, threshold: float = 0.95) -> list[tuple[int, int, float]]:
    """``(a row, b row, cosine)`` of every pair with cosine >= ``threshold``, most similar first."""
    import faiss

    index = faiss.IndexFlatIP(a.shape[1])
    index.add(np.ascontiguousarray(a, dtype=np.float32))
    # range_search keeps scores strictly above the radius; nudge it down so ">=" holds.
    lims, sims, rows = index.range_search(np.ascontiguousarray(b, dtype=np.float32), float(np.nextafter(
        np.float32(threshold), np.float32(-1))))
    b_rows = np.repeat(np.arange(len(b)), np.diff(lims).astype(np.int64))
    order = np.argsort(-sims, kind="stable")
    return [(int(rows[j]), int(b_rows[j]), float(sims[j])) for j in order]


def compare_embeddings(a: np.ndarray, b: np.ndarray, covariance: str = "auto", permutations: int = 500,
                       max_samples: int = 2000, pr_k: int = 3, seed: int = 0) -> dict[str, Any]:
    """Every distance figure of the module doc for two L2-normalised embedding sets (no files)."""
    rng = np.random.default_rng(seed)
    sa, sb = _subsample(a, max_samples, rng), _subsample(b, max_samples, rng)
    fd, estimator = frechet_distance(a, b, covariance)
    mmd = mmd_permutation_test(sa, sb, permutations, seed)
    pr = precision_recall(sa, sb, pr_k)
    return {
        "n_a": len(a), "n_b": len(b), "dim": int(a.shape[1]),
        "mean_cosine": mean_cosine(a, b),
        "frechet_distance": fd, "frechet": {"covariance": estimator, "shrinkage_because_rows_le_dims":
                                            estimator == "ledoit_wolf" and covariance == "auto"},
        "mmd2": mmd["mmd2"], "mmd_p_value": mmd["p_value"],
        "mmd": {"kernel": "rbf", "bandwidth": mmd["bandwidth"], "permutations": mmd["permutations"],
                "rows_a": len(sa), "rows_b": len(sb), "seed": seed},
        "precision": pr["precision"], "recall": pr["recall"], "pr": {"k": pr_k, "rows_a": len(sa), "rows_b": len(sb)},
    }


# ---------------------------------------------------------------------------- the job


def _set_label(name: str, store: EmbeddingStore, where: str | None) -> str:
    """Legend text of a set: its store's name and filter, cut short (a filter can list many paths)."""
    text = store.root.name + (f" where {where}" if where else "")
    return f"{name}: {text if len(text) <= 48 else text[:45] + '...'}"


def _plot_nn_hist(b_to_a: np.ndarray, a_to_a: np.ndarray, labels: tuple[str, str], path: Path) -> Path:
    """``nn_cosine.png``: histograms (as densities, so sets of any size compare) of each B row's cosine
    to its nearest A row and each A row's to its nearest other A row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(min(b_to_a.min(), a_to_a.min()), 1.0, 40)
    ax.hist(a_to_a, bins=bins, alpha=0.6, density=True, label=f"{labels[0]} -> nearest other {labels[0]}")
    ax.hist(b_to_a, bins=bins, alpha=0.6, density=True, label=f"{labels[1]} -> nearest {labels[0]}")
    ax.set_xlabel("cosine of nearest neighbour")
    ax.set_ylabel("density (share of rows per unit cosine)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def compare_stores(store_a: EmbeddingStore, store_b: EmbeddingStore, out: str | Path, where_a: str | None = None,
                   where_b: str | None = None, covariance: str = "auto", permutations: int = 500,
                   max_samples: int = 2000, pr_k: int = 3, duplicate_threshold: float = 0.95, max_pairs: int = 1000,
                   umap_sample: int = 20000, seed: int = 0) -> dict[str, Any]:
    """Compare the rows of ``store_a`` (matching ``where_a``) with those of ``store_b``; write
    ``report.json`` and the PNGs into ``out`` and return the report."""
    from vlmlab.clusters import plot_map, umap_2d

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids_a, emb_a, meta_a = store_a.embeddings(where=where_a)
    ids_b, emb_b, meta_b = store_b.embeddings(where=where_b)
    for name, store, where, ids in (("A", store_a, where_a, ids_a), ("B", store_b, where_b, ids_b)):
        if len(ids) < 2:
            raise ValueError(f"set {name} ({store.root}{f', --where {where!r}' if where else ''}) has {len(ids)} "
                             "rows; comparing needs at least 2 in each set")
    if emb_a.shape[1] != emb_b.shape[1]:
        raise ValueError(f"embedding sizes differ ({emb_a.shape[1]} vs {emb_b.shape[1]}): the stores were made "
                         f"with different models ({store_a.model!r}, {store_b.model!r}); extract both with one")
    report = compare_embeddings(emb_a, emb_b, covariance, permutations, max_samples, pr_k, seed)

    same_store = store_a.root.resolve() == store_b.root.resolve()
    pairs = [p for p in cross_duplicates(emb_a, emb_b, duplicate_threshold)
             if not (same_store and ids_a[p[0]] == ids_b[p[1]])]  # a row is no duplicate of itself
    paths_a, paths_b = meta_a["path"].to_pylist(), meta_b["path"].to_pylist()
    b_to_a, _ = nearest_cosines(emb_b, emb_a)
    a_to_a, _ = nearest_cosines(emb_a, emb_a, exclude_self=True)
    labels = (_set_label("A", store_a, where_a), _set_label("B", store_b, where_b))

    rng = np.random.default_rng(seed)
    rows_a, rows_b = (np.sort(rng.choice(len(e), min(len(e), umap_sample // 2), replace=False))
                      for e in (emb_a, emb_b))
    coords = umap_2d(np.concatenate([emb_a[rows_a], emb_b[rows_b]]), fit_sample=umap_sample, seed=seed)
    groups = np.r_[np.zeros(len(rows_a), np.int64), np.ones(len(rows_b), np.int64)]
    plot_map(coords, groups, out / "joint_umap.png", "joint UMAP of A and B", names={0: labels[0], 1: labels[1]})
    _plot_nn_hist(b_to_a, a_to_a, ("A", "B"), out / "nn_cosine.png")

    report |= {
        "store_a": str(store_a.root), "store_b": str(store_b.root), "where_a": where_a, "where_b": where_b,
        "nn_cosine_b_to_a": {"mean": float(b_to_a.mean()), "median": float(np.median(b_to_a))},
        "nn_cosine_a_to_a": {"mean": float(a_to_a.mean()), "median": float(np.median(a_to_a))},
        "cross_duplicates": {
            "threshold": duplicate_threshold, "count": len(pairs), "listed": min(len(pairs), max_pairs),
            "pairs": [{"id_a": int(ids_a[i]), "path_a": paths_a[i], "id_b": int(ids_b[j]), "path_b": paths_b[j],
                       "cosine": round(s, 6)} for i, j, s in pairs[:max_pairs]]},
        "files": {"report": "report.json", "joint_umap": "joint_umap.png", "nn_cosine": "nn_cosine.png"},
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    """``vlmlab compare STORE_A STORE_B --out DIR [--where-a ...] [--where-b ...]``."""
    parser = argparse.ArgumentParser(prog="vlmlab compare", description=__doc__.split("\n")[0])
    fields = CompareConfig.__dataclass_fields__
    parser.add_argument("store_a_dir", metavar="STORE_A", help=fields["store_a"].metadata["help"])
    parser.add_argument("store_b_dir", metavar="STORE_B", help=fields["store_b"].metadata["help"])
    parser.add_argument("--config", help="YAML file filling CompareConfig")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    add_config_arguments(parser, CompareConfig, skip=("store_a", "store_b"))
    args = parser.parse_args(argv)
    cfg = config_from_args(CompareConfig, args, args.config,
                           [*args.overrides, f"store_a={args.store_a_dir}", f"store_b={args.store_b_dir}"])
    if cfg.covariance not in COVARIANCES:
        parser.error(f"--covariance must be one of {', '.join(COVARIANCES)}, not {cfg.covariance!r}")
    report = compare_stores(
        EmbeddingStore.open(cfg.store_a), EmbeddingStore.open(cfg.store_b), cfg.out, where_a=cfg.where_a,
        where_b=cfg.where_b, covariance=cfg.covariance, permutations=cfg.permutations, max_samples=cfg.max_samples,
        pr_k=cfg.pr_k, duplicate_threshold=cfg.duplicate_threshold, max_pairs=cfg.max_pairs,
        umap_sample=cfg.umap_sample, seed=cfg.seed)
    keys = ("n_a", "n_b", "mean_cosine", "frechet_distance", "mmd2", "mmd_p_value", "precision", "recall")
    print(json.dumps({k: report[k] for k in keys} | {"cross_duplicates": report["cross_duplicates"]["count"]},
                     indent=1))
    print(f"wrote {Path(cfg.out) / 'report.json'}")


if __name__ == "__main__":
    main()
