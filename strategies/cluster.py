"""Built-in channel clusterers: ``single``, ``agglomerative``, ``spectral``, ``kmeans``.

Each groups channels from a co-activation matrix (|correlation| derived from second moments).
``n_clusters=None`` chooses the number automatically (best silhouette over 2..max_clusters).
Deterministic for a given ``seed``.
"""

from __future__ import annotations

import numpy as np

from hsc_plugin.registry import hookimpl
from hsc_plugin.strategy import ChannelClusterer

__all__ = ["SingleCluster", "AgglomerativeClusterer", "SpectralClusterer", "KMeansClusterer", "relabel"]


def relabel(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0..k-1 in order of first appearance (stable across equivalent runs)."""
    _, first = np.unique(labels, return_index=True)
    order = np.asarray(labels)[np.sort(first)]
    mapping = {lab: i for i, lab in enumerate(order)}
    return np.array([mapping[v] for v in labels], dtype=np.int64)


class _SklearnClusterer(ChannelClusterer):
    def __init__(self, n_clusters: int | None = 4, seed: int = 0, max_clusters: int = 8) -> None:
        if n_clusters is not None and n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1 or None (automatic), got {n_clusters!r}")
        self.n_clusters = n_clusters
        self.seed = int(seed)
        self.max_clusters = int(max_clusters)

    def _fit(self, coactivation: np.ndarray, k: int) -> np.ndarray:
        raise NotImplementedError

    def cluster(self, coactivation: np.ndarray) -> np.ndarray:
        A = np.clip(np.nan_to_num(np.abs(np.asarray(coactivation, dtype=np.float64))), 0.0, 1.0)
        n = A.shape[0]
        if self.n_clusters is not None:
            k = min(self.n_clusters, n)
            return relabel(self._fit(A, k)) if k > 1 else np.zeros(n, dtype=np.int64)
        from sklearn.metrics import silhouette_score

        D = 1.0 - A
        np.fill_diagonal(D, 0.0)
        best, best_score = np.zeros(n, dtype=np.int64), -np.inf
        for k in range(2, min(self.max_clusters, n - 1) + 1):
            labels = self._fit(A, k)
            if len(np.unique(labels)) < 2:
                continue
            score = silhouette_score(D, labels, metric="precomputed")
            if score > best_score:
                best, best_score = labels, score
        return relabel(best)


class SingleCluster(ChannelClusterer):
    """All channels in one cluster (plain per-region SVD)."""

    name = "single"

    def cluster(self, coactivation: np.ndarray) -> np.ndarray:
        return np.zeros(np.asarray(coactivation).shape[0], dtype=np.int64)


class AgglomerativeClusterer(_SklearnClusterer):
    """Average-linkage agglomerative clustering on the distance 1 − |corr|."""

    name = "agglomerative"

    def _fit(self, A: np.ndarray, k: int) -> np.ndarray:
        from sklearn.cluster import AgglomerativeClustering

        D = 1.0 - A
        np.fill_diagonal(D, 0.0)
        return AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(D)


class SpectralClusterer(_SklearnClusterer):
    """Spectral clustering with |corr| as the affinity."""

    name = "spectral"

    def _fit(self, A: np.ndarray, k: int) -> np.ndarray:
        from sklearn.cluster import SpectralClustering

        return SpectralClustering(n_clusters=k, affinity="precomputed", random_state=self.seed,
                                  assign_labels="cluster_qr").fit_predict(A + 1e-9)


class KMeansClusterer(_SklearnClusterer):
    """k-means on the channels' co-activation profiles (rows of |corr|)."""

    name = "kmeans"

    def _fit(self, A: np.ndarray, k: int) -> np.ndarray:
        from sklearn.cluster import KMeans

        return KMeans(n_clusters=k, random_state=self.seed, n_init=10).fit_predict(A)


@hookimpl
def hsc_clusterers() -> list[type]:
    return [SingleCluster, AgglomerativeClusterer, SpectralClusterer, KMeansClusterer]
