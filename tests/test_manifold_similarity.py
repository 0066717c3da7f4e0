import math

import pytest
import torch

from lightning_mka.errors import MKAError
from lightning_mka.manifold import DiffusionMapConfig, diffusion_map, squared_distances
from lightning_mka.similarity import (
    SimilarityConfig,
    binned_labels,
    default_bins,
    ksg_mutual_information,
    layer_feature,
    normalized_mutual_information,
    pair_score,
    similarity_matrix,
)


def circle(n=400, noise=0.0, seed=0, dim=10):
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(n, generator=g) * 2 * math.pi
    x = torch.zeros(n, dim, dtype=torch.float64)
    x[:, 0], x[:, 1] = torch.cos(theta), torch.sin(theta)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return (x + noise * torch.randn(n, dim, generator=g, dtype=torch.float64)) @ rotation, theta


def test_squared_distances_match_cdist():
    x = torch.randn(50, 7, dtype=torch.float64)
    assert torch.allclose(squared_distances(x), torch.cdist(x, x) ** 2, atol=1e-9)
    assert torch.all(squared_distances(x).diagonal() == 0)


def test_diffusion_map_recovers_circle():
    # A circle embedded in 10-D: the first two diffusion coordinates are (cos, sin) of the angle up to rotation,
    # so the embedded points lie on a circle (constant radius) and keep the angular order.
    x, theta = circle()
    embedding, eigenvalues = diffusion_map(x, DiffusionMapConfig(embedding_dim=2, bandwidth_scale=0.1))
    radius = embedding.norm(dim=1)
    assert radius.std() / radius.mean() < 0.05
    assert eigenvalues[0] < 1.0 and eigenvalues[0] > 0.5
    # the two leading non-trivial eigenvalues of a circle are a degenerate pair
    assert abs(eigenvalues[0] - eigenvalues[1]) < 0.02
    angle = torch.atan2(embedding[:, 1], embedding[:, 0])
    # circular correlation between recovered and true angle (either orientation)
    z = torch.exp(1j * (angle - theta.double())).mean().abs()
    z_flip = torch.exp(1j * (angle + theta.double())).mean().abs()
    assert max(z, z_flip) > 0.95


def test_diffusion_map_is_deterministic_and_sign_fixed():
    x, _ = circle(200)
    a, _ = diffusion_map(x)
    b, _ = diffusion_map(x.clone())
    assert torch.equal(a, b)
    c, _ = diffusion_map(x * 3.0)  # median bandwidth: scale invariant
    assert torch.allclose(a, c, atol=1e-8)


def test_diffusion_map_rejects_embedding_dim_not_below_points():
    with pytest.raises(MKAError, match="embedding_dim=5 must be < num_points=5"):
        diffusion_map(torch.randn(5, 3), DiffusionMapConfig(embedding_dim=5))


def test_default_bins_matches_spec():
    assert default_bins(1024, 2) == 4
    assert default_bins(8, 2) == 2


@pytest.mark.parametrize("estimator", ["binned", "ksg"])
def test_npib_identical_independent_symmetric(estimator):
    torch.manual_seed(0)
    config = SimilarityConfig(measure="npib", estimator=estimator)
    a = torch.randn(512, 16)
    b = torch.randn(512, 16)
    fa, fb = layer_feature(a, config), layer_feature(b, config)
    same = pair_score(fa, layer_feature(a.clone(), config), config)
    assert same == pytest.approx(1.0, abs=1e-6) if estimator == "binned" else same > 0.999
    independent = pair_score(fa, fb, config)
    assert 0.0 <= independent < 0.15
    assert pair_score(fa, fb, config) == pytest.approx(pair_score(fb, fa, config), abs=1e-12)


def test_npib_tracks_shared_structure():
    # Two layers that see the same circle (rotated, rescaled, slightly noisy) are far more similar than a layer of noise.
    x, _ = circle(512, noise=0.01)
    y = 2.5 * circle(512, noise=0.01, seed=0)[0] @ torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))[0]
    z = torch.randn(512, 10, dtype=torch.float64)
    config = SimilarityConfig()
    fx, fy, fz = (layer_feature(p, config) for p in (x, y, z))
    assert pair_score(fx, fy, config) > 0.8
    assert pair_score(fx, fz, config) < 0.2


def test_binned_labels_equal_frequency():
    labels = binned_labels(torch.randn(400, 2, dtype=torch.float64), 4)
    assert labels.min() >= 0 and labels.max() < 16
    assert int(torch.bincount(labels, minlength=16).sum()) == 400
    # each coordinate's bins hold exactly P / b points
    assert torch.bincount(labels % 4).tolist() == [100] * 4


def test_nmi_bounds():
    a = torch.tensor([0, 0, 1, 1, 2, 2])
    assert normalized_mutual_information(a, a) == pytest.approx(1.0)
    assert normalized_mutual_information(a, torch.tensor([5, 5, 7, 7, 9, 9])) == pytest.approx(1.0)
    assert normalized_mutual_information(torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.0)


def test_ksg_never_nan_and_detects_dependence():
    x = torch.randn(300, 2, dtype=torch.float64)
    assert ksg_mutual_information(x, x + 0.01 * torch.randn_like(x)) > 1.0
    assert ksg_mutual_information(x, torch.randn(300, 2, dtype=torch.float64)) < 0.1
    constant = torch.zeros(300, 2, dtype=torch.float64)
    value = ksg_mutual_information(constant, constant)
    assert math.isfinite(value) and value >= 0.0


@pytest.mark.parametrize("measure", ["cosine", "cka", "angular", "npib"])
def test_matrix_unit_diagonal_symmetric_bounded(measure):
    torch.manual_seed(1)
    base = torch.randn(256, 12)
    points = [base, base + 0.1 * torch.randn(256, 12), torch.randn(256, 12)]
    config = SimilarityConfig(measure=measure)
    sim = similarity_matrix([layer_feature(p, config) for p in points], config)
    assert torch.allclose(sim, sim.T)
    assert torch.all(sim.diagonal() == 1.0)
    assert sim.min() >= 0.0 and sim.max() <= 1.0 + 1e-9
    assert sim[0, 1] > sim[0, 2]


def test_cka_invariant_to_rotation_and_scale():
    x = torch.randn(200, 8, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    config = SimilarityConfig(measure="cka")
    assert pair_score(layer_feature(x, config), layer_feature(3 * x @ q, config), config) == pytest.approx(1.0, abs=1e-9)


def test_similarity_config_errors_name_the_value():
    with pytest.raises(MKAError, match="unknown similarity 'dot'"):
        SimilarityConfig(measure="dot")
    with pytest.raises(MKAError, match="num_points=7 is too few"):
        SimilarityConfig().check_points(7)


@pytest.mark.parametrize("dim", [2, 4])
def test_lanczos_gives_the_same_embedding_as_the_full_eigh(dim):
    """Diffusion maps keep only the leading eigenpairs: from LANCZOS_MIN_POINTS points on they come from Lanczos."""
    g = torch.Generator().manual_seed(3)
    t = torch.rand(400, generator=g) * 2 * math.pi
    points = torch.stack([t.cos(), t.sin(), 0.3 * (3 * t).sin()], 1) @ torch.randn(3, 24, generator=g) + 0.05 * torch.randn(400, 24, generator=g)
    full = diffusion_map(points, DiffusionMapConfig(embedding_dim=dim, eigensolver="eigh"))
    lanczos = diffusion_map(points, DiffusionMapConfig(embedding_dim=dim, eigensolver="lanczos"))
    auto = diffusion_map(points, DiffusionMapConfig(embedding_dim=dim))
    torch.testing.assert_close(lanczos[1], full[1], rtol=0, atol=1e-10)
    torch.testing.assert_close(lanczos[0], full[0], rtol=0, atol=1e-9)
    assert torch.equal(auto[0], lanczos[0])  # 400 points >= LANCZOS_MIN_POINTS: auto takes Lanczos
    with pytest.raises(MKAError, match="unknown eigensolver 'qr'"):
        DiffusionMapConfig(eigensolver="qr")


@pytest.mark.parametrize("eigensolver", ["eigh", "lanczos"])
def test_a_far_point_does_not_become_the_embedding(eigensolver):
    """A point far from the rest (a massive activation) has kernel entries that underflow: the graph splits and eigenvalue 1
    appears twice. Both trivial eigenpairs are dropped, so the coordinates still describe the other points' geometry."""
    config = SimilarityConfig(diffusion=DiffusionMapConfig(eigensolver=eigensolver))
    a = circle(300, noise=0.05, seed=0)[0].float()
    b = a + 0.02 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))
    clean = pair_score(layer_feature(a, config), layer_feature(b, config), config)
    a[5] *= 100
    b[5] *= 100
    embedding, eigenvalues = diffusion_map(a.double(), config.diffusion)
    assert (eigenvalues < 1 - 1e-6).all()  # no trivial pair among the coordinates
    others = torch.cat([embedding[:5], embedding[6:]])
    assert (others.amax(0) - others.amin(0) > 1e-3).all()  # each coordinate varies over the other 299 points
    assert pair_score(layer_feature(a, config), layer_feature(b, config), config) == pytest.approx(clean, abs=0.03)


@pytest.mark.parametrize("eigensolver", ["eigh", "lanczos"])
def test_constant_layers_are_one_cell_and_score_deterministically(eigensolver):
    # Coinciding points have no geometry: the embedding is constant (not a solver's round-off ranked by point index),
    # two such layers are identical (score 1) and one carries no information about a layer with structure (score 0).
    config = SimilarityConfig(diffusion=DiffusionMapConfig(eigensolver=eigensolver))
    constant = torch.ones(300, 16)
    embedding, _ = diffusion_map(constant.double(), config.diffusion)
    assert (embedding == 0).all()
    assert binned_labels(embedding, 4).unique().numel() == 1
    feature = layer_feature(constant, config)
    assert pair_score(feature, layer_feature(constant.clone(), config), config) == 1.0
    assert pair_score(feature, layer_feature(circle(300, seed=2)[0].float(), config), config) == 0.0
