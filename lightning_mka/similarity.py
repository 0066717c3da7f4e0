"""Layer similarity measures behind one interface (pure functions, no Lightning).

Each measure turns one layer's ``(P, H)`` points into a *feature* once, then scores pairs of features, so that
after a merge only the layers that changed are re-featurized. All scores are similarities in ``[0, 1]``
(1 = the same), and the matrix is symmetric with a unit diagonal.

- ``npib`` (default, the paper's measure): normalised mutual information ``I(E_i; E_j) / sqrt(H(E_i) H(E_j))``
  between the layers' diffusion-map embeddings ``E``.
  - estimator ``binned`` (default): rank-normalise each embedding coordinate into ``bins`` equal-frequency bins,
    label each point by its joint cell, and compute discrete entropies / MI from counts; exactly in [0, 1].
  - estimator ``ksg``: Kraskov-Stoegbauer-Grassberger k-NN mutual information ``I`` (clamped at 0), mapped to
    [0, 1) by Linfoot's informational coefficient of correlation ``1 - exp(-2 I)``: differential entropies can be
    negative, so the ``sqrt(H H)`` normalisation is undefined for continuous variables; this never returns NaN.
- ``cosine``: mean cosine between the two layers' points (clamped at 0).
- ``cka``: linear centred kernel alignment of the points.
- ``angular``: ``1 - mean(arccos(cos) / pi)``, the similarity form of the angular distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lightning_mka.errors import MKAError
from lightning_mka.manifold import DiffusionMapConfig, diffusion_map

MEASURES = ("npib", "cosine", "cka", "angular")
NPIB_ESTIMATORS = ("binned", "ksg")


def default_bins(num_points: int, embedding_dim: int) -> int:
    """``max(2, floor((P / 4) ** (1 / (2 d))))``: about four points per joint cell of two layers' labels."""
    return max(2, math.floor((num_points / 4) ** (1.0 / (2 * embedding_dim)) + 1e-9))


def binned_labels(embedding: torch.Tensor, bins: int) -> torch.Tensor:
    """Joint equal-frequency cell of each point: one label in ``[0, bins ** d)`` per point."""
    num_points, dim = embedding.shape
    ranks = torch.argsort(torch.argsort(embedding, dim=0, stable=True), dim=0, stable=True)
    cells = (ranks * bins) // num_points  # (P, d) in [0, bins)
    constant = embedding.amax(0) == embedding.amin(0)
    cells[:, constant] = 0  # a coordinate with one value is one cell (not cut by point index)
    weights = bins ** torch.arange(dim, dtype=torch.long)
    return (cells.long() * weights).sum(1)


def _entropy(counts: torch.Tensor) -> float:
    p = counts[counts > 0].double() / counts.sum()
    return float(-(p * p.log()).sum())


def normalized_mutual_information(labels_a: torch.Tensor, labels_b: torch.Tensor) -> float:
    """``I(A; B) / sqrt(H(A) H(B))`` of two discrete labelings of the same points, in [0, 1]."""
    _, a = torch.unique(labels_a, return_inverse=True)
    _, b = torch.unique(labels_b, return_inverse=True)
    na, nb = int(a.max()) + 1, int(b.max()) + 1
    joint = torch.bincount(a * nb + b, minlength=na * nb).view(na, nb)
    h_a, h_b = _entropy(joint.sum(1)), _entropy(joint.sum(0))
    if h_a == 0.0 or h_b == 0.0:  # a constant labeling carries no information
        return 1.0 if h_a == h_b == 0.0 else 0.0
    mi = h_a + h_b - _entropy(joint.flatten())
    return float(min(1.0, max(0.0, mi / math.sqrt(h_a * h_b))))


def ksg_mutual_information(x: torch.Tensor, y: torch.Tensor, k: int = 3) -> float:
    """Kraskov et al. (2004) estimator 1 of ``I(X; Y)`` in nats, max-norm, clamped at 0 (never NaN)."""
    n = x.shape[0]
    if n <= k:
        return 0.0
    x, y = x.double(), y.double()
    dx = torch.cdist(x, x, p=float("inf"))
    dy = torch.cdist(y, y, p=float("inf"))
    dz = torch.maximum(dx, dy)
    dz.fill_diagonal_(float("inf"))
    eps = dz.kthvalue(k, dim=1).values  # distance to the k-th neighbour in the joint space
    dx.fill_diagonal_(float("inf"))
    dy.fill_diagonal_(float("inf"))
    nx = (dx < eps[:, None]).sum(1).double()
    ny = (dy < eps[:, None]).sum(1).double()
    digamma = torch.special.digamma
    mi = digamma(torch.tensor(float(k))) + digamma(torch.tensor(float(n))) - (digamma(nx + 1) + digamma(ny + 1)).mean()
    value = float(mi)
    return max(0.0, value) if math.isfinite(value) else 0.0


@dataclass(frozen=True)
class SimilarityConfig:
    measure: str = "npib"
    estimator: str = "binned"
    bins: int | None = None  # None: default_bins(P, d)
    ksg_k: int = 3
    diffusion: DiffusionMapConfig = field(default_factory=DiffusionMapConfig)

    def __post_init__(self) -> None:
        if self.measure not in MEASURES:
            raise MKAError(f"unknown similarity {self.measure!r}; use one of {', '.join(MEASURES)}")
        if self.estimator not in NPIB_ESTIMATORS:
            raise MKAError(f"unknown npib estimator {self.estimator!r}; use one of {', '.join(NPIB_ESTIMATORS)}")
        if self.bins is not None and self.bins < 2:
            raise MKAError(f"bins must be >= 2, got {self.bins}")
        if self.ksg_k < 1:
            raise MKAError(f"ksg_k must be >= 1, got {self.ksg_k}")

    def check_points(self, num_points: int) -> None:
        """Fail early when ``num_points`` cannot support the measure's settings."""
        if self.measure != "npib":
            return
        d = self.diffusion.embedding_dim
        if d >= num_points:
            raise MKAError(f"embedding_dim={d} must be < num_points={num_points}; lower embedding_dim or raise num_points")
        bins = self.bins or default_bins(num_points, d)
        if self.estimator == "binned" and num_points < 2 * bins**d:
            raise MKAError(
                f"num_points={num_points} is too few for {bins}^{d} NPIB cells (need >= {2 * bins**d}); raise num_points or lower bins / embedding_dim"
            )
        if self.estimator == "ksg" and num_points <= self.ksg_k:
            raise MKAError(f"num_points={num_points} must exceed ksg_k={self.ksg_k}")


def layer_feature(points: torch.Tensor, config: SimilarityConfig):
    """What a measure keeps of one layer's ``(P, H)`` points."""
    x = points.double()
    if config.measure == "npib":
        embedding, _ = diffusion_map(x, config.diffusion)
        if config.estimator == "ksg":
            return embedding
        return binned_labels(embedding, config.bins or default_bins(x.shape[0], config.diffusion.embedding_dim))
    if config.measure in ("cosine", "angular"):
        return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
    centered = x - x.mean(0, keepdim=True)  # cka
    return centered, torch.linalg.matrix_norm(centered.T @ centered)


def pair_score(a, b, config: SimilarityConfig) -> float:
    if config.measure == "npib":
        if config.estimator == "ksg":
            return 1.0 - math.exp(-2.0 * ksg_mutual_information(a, b, config.ksg_k))
        return normalized_mutual_information(a, b)
    if config.measure == "cosine":
        return float((a * b).sum(1).mean().clamp(min=0.0))
    if config.measure == "angular":
        cos = (a * b).sum(1).clamp(-1.0, 1.0)
        return float(1.0 - (torch.arccos(cos) / math.pi).mean())
    (ca, na), (cb, nb) = a, b
    denom = float(na * nb)
    return float(torch.linalg.matrix_norm(ca.T @ cb) ** 2 / denom) if denom > 0 else 0.0


def similarity_matrix(features: list, config: SimilarityConfig) -> torch.Tensor:
    """Symmetric ``L x L`` similarity of precomputed layer features (unit diagonal)."""
    n = len(features)
    sim = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            sim[i, j] = sim[j, i] = pair_score(features[i], features[j], config)
    return sim
