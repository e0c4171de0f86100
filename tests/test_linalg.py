"""lrj.linalg: every decomposition checked by the mathematical property that defines it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lrj
from lowrank_jax import linalg
from lowrank_jax.optim import _linalg as optim_linalg


# Test data and test-side arithmetic are numpy (instant); only lrj.linalg runs in JAX.


def normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def low_rank(seed, m, n, r):
    return normal(seed, (m, r)) @ normal(seed + 1000, (r, n))


def with_spectrum(seed, m, n, s):
    """``u diag(s) v^T`` with Haar-like orthonormal ``u: [m, k]``, ``v: [n, k]``."""
    u, _ = np.linalg.qr(normal(seed, (m, len(s))).astype(np.float64))
    v, _ = np.linalg.qr(normal(seed + 1, (n, len(s))).astype(np.float64))
    return ((u * np.asarray(s)) @ v.T).astype(np.float32)


def assert_orthonormal_columns(u, atol=1e-5):
    u = np.asarray(u, np.float64)
    eye = np.broadcast_to(np.eye(u.shape[-1]), u.shape[:-2] + (u.shape[-1],) * 2)
    np.testing.assert_allclose(np.swapaxes(u, -1, -2) @ u, eye, atol=atol)


def fro(x):
    return float(np.linalg.norm(np.asarray(x, np.float64)))


# ---------------------------------------------------------------------------- SVD


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (2, 3, 5, 4)])
def test_svd_reconstructs_with_orthonormal_factors_and_descending_values(shape):
    w = normal(0, shape)
    u, s, vh = linalg.svd(w)
    np.testing.assert_allclose((u * s[..., None, :]) @ vh, w, atol=1e-5)
    assert_orthonormal_columns(u)
    assert_orthonormal_columns(jnp.swapaxes(vh, -1, -2))
    assert bool(jnp.all(jnp.diff(s, axis=-1) <= 0)) and bool(jnp.all(s >= 0))
    u2, s2, vh2 = linalg.svd(w, 2)
    np.testing.assert_allclose(u2, u[..., :2], atol=1e-6)
    np.testing.assert_allclose(s2, s[..., :2], atol=1e-6)
    np.testing.assert_allclose(vh2, vh[..., :2, :], atol=1e-6)


@pytest.mark.parametrize("by", ["u", "vh"])
def test_canonical_signs_do_not_depend_on_the_input_signs(by):
    u, s, vh = jnp.linalg.svd(normal(1, (7, 5)), full_matrices=False)
    flips = jnp.array([1.0, -1.0, -1.0, 1.0, -1.0])
    cu, cvh = linalg.canonical_signs(u, vh, by=by)
    fu, fvh = linalg.canonical_signs(u * flips, vh * flips[:, None], by=by)
    np.testing.assert_array_equal(cu, fu)
    np.testing.assert_array_equal(cvh, fvh)
    np.testing.assert_allclose((cu * s) @ cvh, (u * s) @ vh, atol=1e-6)  # the product is unchanged
    ref = cu.T if by == "u" else cvh
    largest = jnp.take_along_axis(ref, jnp.argmax(jnp.abs(ref), axis=1)[:, None], axis=1)
    assert bool(jnp.all(largest > 0))
    with pytest.raises(ValueError, match="`by` must be 'u' or 'vh', got 'v'"):
        linalg.canonical_signs(u, vh, by="v")


def test_svd_is_the_same_for_a_matrix_and_its_sign_flipped_factors():
    # w = u s vh with pairs negated is the same matrix; svd(w) is the canonical one either way.
    w = with_spectrum(2, 6, 5, [5.0, 3.0, 2.0, 1.0])
    u, s, vh = linalg.svd(w, 4)
    assert_orthonormal_columns(u)
    np.testing.assert_allclose(s, [5.0, 3.0, 2.0, 1.0], rtol=1e-5)
    again = linalg.svd(((-u) * s) @ (-vh), 4)
    np.testing.assert_allclose(again[0], u, atol=1e-5)
    np.testing.assert_allclose(again[2], vh, atol=1e-5)


def test_svd_rank_above_the_numerical_rank_gives_zero_values_and_an_orthonormal_completion():
    w = low_rank(3, 6, 5, 2)
    u, s, vh = linalg.svd(w, 4)
    assert u.shape == (6, 4) and s.shape == (4,) and vh.shape == (4, 5)
    assert float(s[2]) < 1e-5 * float(s[0]) and float(s[3]) < 1e-5 * float(s[0])
    assert_orthonormal_columns(u)
    assert_orthonormal_columns(vh.T)
    np.testing.assert_allclose((u * s) @ vh, w, atol=1e-4)


@pytest.mark.parametrize("rank", [0, -1, 6, 2.5, True, "2"])
def test_svd_rejects_bad_ranks(rank):
    with pytest.raises(ValueError, match="`rank` must be"):
        linalg.svd(normal(0, (5, 4)), rank)


def test_svd_rank_above_min_names_the_shape():
    with pytest.raises(ValueError, match=r"`rank` must be in \[1, 4\] \(min\(m, n\) of a \(5, 4\) matrix\), got 5"):
        linalg.svd(normal(0, (5, 4)), 5)
    with pytest.raises(ValueError, match="non-empty matrix"):
        linalg.svd(jnp.ones(3))


# ---------------------------------------------------------------------------- randomized SVD


def halko_reference(w, omega, niter):
    """The algorithm as lrj.optim._linalg and lrj.adapters.lora wrote it before lrj.linalg (2-D, probes given)."""
    q, _ = np.linalg.qr(w @ omega)
    for _ in range(niter):
        z, _ = np.linalg.qr(w.T @ q)
        q, _ = np.linalg.qr(w @ z)
    ub, s, vh = np.linalg.svd(q.T @ w, full_matrices=False)
    return q @ ub, s, vh


@pytest.mark.parametrize("oversample,niter", [(8, 2), (0, 1)])  # GaLore's defaults, peft's fast PiSSA
def test_randomized_svd_is_halko_with_the_documented_draws(oversample, niter):
    w = with_spectrum(4, 12, 9, 0.7 ** np.arange(9))
    key, rank = jax.random.key(5), 3
    u, s, vh = linalg.randomized_svd(key, w, rank, oversample=oversample, niter=niter, canonical=False)
    omega = jax.random.normal(key, (9, min(rank + oversample, 9)))
    ru, rs, rvh = halko_reference(np.asarray(w, np.float64), np.asarray(omega, np.float64), niter)
    np.testing.assert_allclose(s, rs[:rank], rtol=1e-4)
    sign = np.sign(np.sum(np.asarray(u) * ru[:, :rank], axis=0))  # LAPACK builds may differ by a sign per pair
    np.testing.assert_allclose(u * sign, ru[:, :rank], atol=1e-4)
    np.testing.assert_allclose(vh * sign[:, None], rvh[:rank], atol=1e-4)
    cu, cs, cvh = linalg.randomized_svd(key, w, rank, oversample=oversample, niter=niter)
    ref_u, ref_vh = linalg.canonical_signs(u, vh)
    np.testing.assert_allclose(cu, ref_u, atol=1e-6)
    np.testing.assert_allclose(cvh, ref_vh, atol=1e-6)


def test_randomized_svd_is_exact_on_an_exactly_low_rank_matrix():
    w = low_rank(6, 20, 15, 3)
    u, s, vh = linalg.randomized_svd(jax.random.key(0), w, 3, oversample=0, niter=0)
    eu, es, evh = linalg.svd(w, 3)
    np.testing.assert_allclose(s, es, rtol=1e-4)
    np.testing.assert_allclose(u, eu, atol=1e-4)
    np.testing.assert_allclose(vh, evh, atol=1e-4)


def test_randomized_svd_error_is_near_optimal_and_decreases_with_power_iterations():
    w = with_spectrum(7, 40, 30, 0.9 ** np.arange(30))
    rank = 5
    optimum = float(linalg.approximation_error(w, rank))
    errors = []
    for niter in (0, 1, 4):
        u, s, vh = linalg.randomized_svd(jax.random.key(1), w, rank, oversample=0, niter=niter)
        errors.append(fro(w - (u * s) @ vh))
    assert errors[0] > errors[1] > errors[2] >= optimum * (1 - 1e-5)
    assert errors[2] < 1.05 * optimum
    u, s, vh = linalg.randomized_svd(jax.random.key(1), w, rank)  # defaults: oversample 8, niter 2
    assert fro(w - (u * s) @ vh) < 1.01 * optimum


def test_randomized_svd_batched_is_per_matrix_with_the_batched_draw():
    w = normal(8, (3, 10, 7))
    key = jax.random.key(2)
    u, s, vh = linalg.randomized_svd(key, w, 2, oversample=2, niter=1, canonical=False)
    omega = jax.random.normal(key, (3, 7, 4))
    for i in range(3):
        ru, rs, rvh = halko_reference(np.asarray(w[i], np.float64), np.asarray(omega[i], np.float64), 1)
        sign = np.sign(np.sum(np.asarray(u[i]) * ru[:, :2], axis=0))
        np.testing.assert_allclose(s[i], rs[:2], rtol=1e-4)
        np.testing.assert_allclose(u[i] * sign, ru[:, :2], atol=1e-4)


def test_randomized_svd_validates_its_arguments():
    w = normal(0, (6, 4))
    with pytest.raises(ValueError, match=r"`rank` must be in \[1, 4\]"):
        linalg.randomized_svd(jax.random.key(0), w, 5)
    with pytest.raises(ValueError, match="`oversample` must be >= 0, got -1"):
        linalg.randomized_svd(jax.random.key(0), w, 2, oversample=-1)
    with pytest.raises(ValueError, match="`niter` must be an integer"):
        linalg.randomized_svd(jax.random.key(0), w, 2, niter=1.5)


def test_optim_helpers_delegate_with_their_old_signatures():
    w = normal(9, (2, 8, 6))
    key = jax.random.key(3)
    u, s, vh = optim_linalg.randomized_svd(w, 3, key, oversample=2, power_iters=1)
    ru, rs, rvh = linalg.randomized_svd(key, w, 3, oversample=2, niter=1, canonical=False)
    np.testing.assert_array_equal(u, ru)
    np.testing.assert_array_equal(s, rs)
    clamped = jax.eval_shape(lambda: optim_linalg.randomized_svd(w, 10, key))  # k above min(m, n) is clamped, as before
    assert clamped[0].shape == (2, 8, 6)
    cu, cvh = optim_linalg.canonical_signs(u, vh, by="vh")
    lu, lvh = linalg.canonical_signs(u, vh, by="vh")
    np.testing.assert_array_equal(cu, lu)
    np.testing.assert_array_equal(cvh, lvh)


# ---------------------------------------------------------------------------- Eckart-Young


def test_best_rank_r_is_eckart_young_optimal():
    w = normal(10, (8, 6))
    rank = 2
    best = linalg.best_rank_r(w, rank)
    s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
    err = fro(w - best)
    np.testing.assert_allclose(err, np.sqrt(np.sum(s[rank:] ** 2)), rtol=1e-5)
    np.testing.assert_allclose(linalg.approximation_error(w, rank), np.sqrt(np.sum(s[rank:] ** 2)), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(w - best), 2), s[rank], rtol=1e-5)
    np.testing.assert_allclose(linalg.approximation_error(w, rank, norm="spectral"), s[rank], rtol=1e-5)
    assert np.linalg.matrix_rank(np.asarray(best, np.float64), tol=1e-4) == rank

    rng = np.random.default_rng(11)
    random_candidates = rng.standard_normal((200, 8, rank)) @ rng.standard_normal((200, rank, 6))
    q, _ = np.linalg.qr(w)
    truncated_qr = q[:, :rank] @ (q[:, :rank].T @ w)  # the best approximation in a non-singular subspace
    u, sv, vh = (np.asarray(t, np.float64) for t in linalg.svd(w, rank))
    perturbed = (u + 0.01 * rng.standard_normal((200,) + u.shape)) * sv @ vh  # near the optimum
    for candidates in (random_candidates, truncated_qr[None], perturbed):
        assert np.min(np.linalg.norm(w - candidates, axis=(-2, -1))) >= err * (1 - 1e-6)
        assert np.min(np.linalg.norm(w - candidates, ord=2, axis=(-2, -1))) >= s[rank] * (1 - 1e-5)


def test_best_rank_r_edges_batch_and_errors():
    w = normal(12, (3, 5, 4))
    np.testing.assert_allclose(linalg.best_rank_r(w, 4), w, atol=1e-5)
    np.testing.assert_array_equal(linalg.best_rank_r(w, 0), jnp.zeros_like(w))
    np.testing.assert_allclose(linalg.approximation_error(w, 0), jnp.linalg.norm(w, axis=(1, 2)), rtol=1e-5)
    np.testing.assert_array_equal(linalg.approximation_error(w, 4), jnp.zeros(3))
    np.testing.assert_array_equal(linalg.approximation_error(w, 4, norm="spectral"), jnp.zeros(3))
    for i in range(3):
        np.testing.assert_allclose(linalg.best_rank_r(w, 2)[i], linalg.best_rank_r(w[i], 2), atol=1e-6)
    with pytest.raises(ValueError, match=r"`rank` must be in \[0, 4\]"):
        linalg.best_rank_r(w, 5)
    with pytest.raises(ValueError, match="`norm` must be 'fro' or 'spectral', got 'nuc'"):
        linalg.approximation_error(w, 1, norm="nuc")


# ---------------------------------------------------------------------------- pseudo-inverse

PINV_CASES = {
    "tall": lambda: normal(13, (5, 3)),
    "wide": lambda: normal(14, (3, 5)),
    "rank_deficient": lambda: low_rank(15, 6, 5, 2),
    "singular_square": lambda: low_rank(16, 4, 4, 3),
    "integer_rank_one": lambda: jnp.outer(jnp.arange(1.0, 5.0), jnp.array([1.0, -2.0, 3.0])),
    "zero": lambda: jnp.zeros((3, 4)),
}


@pytest.mark.parametrize("case", sorted(PINV_CASES))
def test_pinv_satisfies_the_four_penrose_conditions_and_matches_numpy(case):
    w = PINV_CASES[case]()
    p = linalg.pinv(w)
    assert p.shape == w.shape[::-1] and bool(jnp.all(jnp.isfinite(p)))
    scale = max(fro(w) * fro(p), 1.0)
    tol = 1e-5 * scale * max(fro(w), fro(p), 1.0)
    np.testing.assert_allclose(w @ p @ w, w, atol=tol)
    np.testing.assert_allclose(p @ w @ p, p, atol=tol)
    np.testing.assert_allclose(w @ p, (w @ p).T, atol=1e-5 * scale)
    np.testing.assert_allclose(p @ w, (p @ w).T, atol=1e-5 * scale)
    rtol = max(w.shape) * np.finfo(np.float32).eps  # the float32 default, as numpy would use on float32 input
    np.testing.assert_allclose(p, np.linalg.pinv(np.asarray(w, np.float64), rtol=rtol), atol=1e-4 * max(fro(p), 1.0))


def test_pinv_gives_the_minimum_norm_least_squares_solution():
    w = low_rank(17, 7, 5, 3)
    y = normal(18, (7, 2))
    x = linalg.pinv(w) @ y
    np.testing.assert_allclose(w.T @ (w @ x - y), 0.0, atol=1e-4)  # normal equations: least squares
    ref = np.linalg.lstsq(np.asarray(w, np.float64), np.asarray(y, np.float64), rcond=7 * np.finfo(np.float32).eps)[0]  # minimum norm
    np.testing.assert_allclose(x, ref, atol=1e-4)
    _, _, vh = np.linalg.svd(np.asarray(w, np.float64))
    np.testing.assert_allclose(vh[3:] @ np.asarray(x), 0.0, atol=1e-5)  # no component in the null space


def test_pinv_rtol_batches_and_non_finite_input():
    w = jnp.diag(jnp.array([1.0, 1e-3, 0.0]))
    np.testing.assert_allclose(linalg.pinv(w), jnp.diag(jnp.array([1.0, 1e3, 0.0])), rtol=1e-6)
    np.testing.assert_allclose(linalg.pinv(w, rtol=1e-2), jnp.diag(jnp.array([1.0, 0.0, 0.0])))
    with_inf = np.eye(3, dtype=np.float32)
    with_inf[0, 1] = np.inf
    batch = np.stack([normal(19, (3, 3)), np.full((3, 3), np.nan, np.float32), with_inf])
    out = linalg.pinv(batch)
    np.testing.assert_allclose(out[0], np.linalg.inv(batch[0]), atol=1e-4)
    assert bool(jnp.all(jnp.isnan(out[1]))) and bool(jnp.all(jnp.isnan(out[2])))
    np.testing.assert_allclose(jax.jit(linalg.pinv)(batch[0]), out[0], atol=1e-6)


def test_check_finite_raises_on_concrete_arrays_and_is_a_no_op_under_jit():
    x = jnp.array([1.0, jnp.nan, jnp.inf, -jnp.inf])
    with pytest.raises(ValueError, match=r"`kernel` has 1 NaN and 2 Inf entries \(of 4\)"):
        linalg.check_finite(x, "kernel")
    with pytest.raises(ValueError, match="NaN"):
        linalg.check_finite(np.array([np.nan], np.float32))
    ok = jnp.ones(3)
    assert linalg.check_finite(ok) is ok
    ints = jnp.arange(3)  # integer arrays hold no NaN: returned as they are
    assert linalg.check_finite(ints) is ints
    assert bool(jnp.isnan(jax.jit(linalg.check_finite)(x)[1]))
    assert float(jax.grad(lambda v: jnp.sum(linalg.check_finite(v)))(1.0)) == 1.0


# ---------------------------------------------------------------------------- CR sampling


def skewed_pair(seed=20, m=4, k=12, n=5):
    scales = (2.0 ** np.arange(-4, k - 4) / 8).astype(np.float32)  # column norms spread over 2^11
    a = normal(seed, (m, k)) * scales
    b = normal(seed + 1, (k, n))
    return a, b


def predicted_variance(a, b, p, samples):
    """Per-entry ``Var[(CR)_ij] = (sum_k a_ik^2 b_kj^2 / p_k - (ab)_ij^2) / c`` (float64)."""
    a, b, p = (np.asarray(t, np.float64) for t in (a, b, p))
    return (np.einsum("ik,kj,k->ij", a**2, b**2, 1 / p) - (a @ b) ** 2) / samples


@pytest.mark.parametrize("probabilities", ["norm", "uniform"])
def test_cr_product_is_unbiased_with_the_predicted_variance(probabilities):
    a, b = skewed_pair()
    samples, draws = 3, 4096
    keys = jax.random.split(jax.random.key(0), draws)
    sample = jax.jit(jax.vmap(lambda k: linalg.cr_product(k, a, b, samples, probabilities=probabilities)))
    estimates = np.asarray(sample(keys), np.float64)
    _, p = linalg.cr_product(keys[0], a, b, samples, probabilities=probabilities, return_probabilities=True)
    exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    var = predicted_variance(a, b, p, samples)
    # Unbiased: by the CLT each entry of the mean is N(ab_ij, var_ij / draws); P(any of 20 |z| > 5) ~ 1e-5.
    z = (estimates.mean(0) - exact) / np.sqrt(var / draws)
    assert np.max(np.abs(z)) < 5, z
    # The variance formula itself: mean squared error over the draws against E||CR - ab||^2.
    np.testing.assert_allclose(np.mean(np.sum((estimates - exact) ** 2, axis=(1, 2))), var.sum(), rtol=0.15)


def test_cr_product_norm_probabilities_are_optimal_and_beat_uniform():
    a, b = skewed_pair()
    _, p = linalg.cr_product(jax.random.key(0), a, b, 4, return_probabilities=True)
    weight = np.linalg.norm(np.asarray(a), axis=0) * np.linalg.norm(np.asarray(b), axis=1)
    np.testing.assert_allclose(p, weight / weight.sum(), rtol=1e-5)
    uniform = np.full(12, 1 / 12)
    optimal = predicted_variance(a, b, p, 4).sum()
    np.testing.assert_allclose(
        optimal, (weight.sum() ** 2 - np.sum((np.asarray(a, np.float64) @ np.asarray(b, np.float64)) ** 2)) / 4, rtol=1e-4
    )
    assert optimal < 0.25 * predicted_variance(a, b, uniform, 4).sum()
    for other in np.random.default_rng(0).dirichlet(np.ones(12), 20):  # no other distribution does better (Cauchy-Schwarz)
        assert predicted_variance(a, b, other, 4).sum() >= optimal * (1 - 1e-6)


def test_cr_product_never_samples_zero_pairs_and_is_exact_when_one_pair_remains():
    a, b = skewed_pair()
    a[:, 3:] = 0.0
    b[1:3] = 0.0  # only pair 0 is nonzero; drawing any other (p = 0) would give 0 / 0
    keys = jax.random.split(jax.random.key(1), 256)
    est = jax.vmap(lambda k: linalg.cr_product(k, a, b, 2))(keys)
    assert bool(jnp.all(jnp.isfinite(est)))
    np.testing.assert_allclose(est, jnp.broadcast_to(jnp.outer(a[:, 0], b[0]), est.shape), rtol=1e-5)
    zero = linalg.cr_product(jax.random.key(0), jnp.zeros((2, 3)), jnp.ones((3, 2)), 4, return_probabilities=True)
    np.testing.assert_array_equal(zero[0], jnp.zeros((2, 2)))
    np.testing.assert_allclose(zero[1], jnp.full(3, 1 / 3))


def test_cr_product_validates_its_arguments():
    a, b = jnp.ones((2, 3)), jnp.ones((3, 4))
    with pytest.raises(ValueError, match=r"\[m, K\] and \[K, n\].*\(2, 3\) and \(4, 3\)"):
        linalg.cr_product(jax.random.key(0), a, b.T, 2)
    with pytest.raises(ValueError, match="`samples` must be >= 1, got 0"):
        linalg.cr_product(jax.random.key(0), a, b, 0)
    with pytest.raises(ValueError, match="`probabilities` must be 'norm' or 'uniform', got 'leverage'"):
        linalg.cr_product(jax.random.key(0), a, b, 2, probabilities="leverage")


# ---------------------------------------------------------------------------- magnitude and direction


@pytest.mark.parametrize("shape,axis", [((6, 4), 0), ((6, 4), 1), ((3, 4, 5), (0, 1))])
def test_magnitude_direction_reconstructs_with_unit_directions(shape, axis):
    w = normal(21, shape)
    m, d = linalg.magnitude_direction(w, axis)
    np.testing.assert_allclose(jnp.expand_dims(m, axis) * d, w, atol=1e-6)
    np.testing.assert_allclose(jnp.sqrt(jnp.sum(d * d, axis=axis)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(m, jnp.sqrt(jnp.sum(w * w, axis=axis)), rtol=1e-6)


def test_magnitude_direction_is_doras_column_norm_and_safe_at_zero():
    w = normal(22, (5, 3))
    w[:, 1] = 0.0  # Flax [in, out]: one magnitude per output unit
    m, d = linalg.magnitude_direction(w)
    assert m.shape == (3,) and float(m[1]) == 0.0
    np.testing.assert_array_equal(d[:, 1], 0.0)
    np.testing.assert_allclose(m * d, w, atol=1e-6)
    grad = jax.grad(lambda v: jnp.sum(linalg.magnitude_direction(v)[1]) + jnp.sum(linalg.magnitude_direction(v)[0]))(w)
    assert bool(jnp.all(jnp.isfinite(grad)))
    w[0, 0] = np.nan
    m_nan, d_nan = linalg.magnitude_direction(w)
    assert bool(jnp.isnan(m_nan[0])) and bool(jnp.all(jnp.isnan(d_nan[:, 0])))
    assert bool(jnp.all(jnp.isfinite(d_nan[:, 1:])))


# ---------------------------------------------------------------------------- CP


def random_cp(seed, shape, rank):
    keys = jax.random.split(jax.random.key(seed), len(shape))
    return tuple(jax.random.normal(k, (size, rank)) for k, size in zip(keys, shape))


def test_cp_als_recovers_an_exactly_low_rank_tensor_with_monotone_error():
    x = linalg.cp_reconstruct(random_cp(23, (5, 6, 7), 3))
    cp = linalg.cp_als(jax.random.key(0), x, 3, iters=300, tol=None)
    rel = fro(x - linalg.cp_reconstruct(cp.factors, cp.weights)) / fro(x)
    assert rel < 1e-4
    assert int(cp.num_iters) == 300 and cp.rel_errors.shape == (300,)
    np.testing.assert_allclose(cp.rel_errors[-1], rel, atol=1e-5)
    assert bool(jnp.all(jnp.diff(cp.rel_errors) <= 1e-6))  # ALS never increases the error
    assert bool(jnp.all(cp.weights >= 0))
    for f in cp.factors:
        np.testing.assert_allclose(jnp.linalg.norm(f, axis=0), 1.0, rtol=1e-5)


def test_cp_als_stops_at_tol_on_a_noisy_four_way_tensor():
    x = linalg.cp_reconstruct(random_cp(24, (3, 4, 3, 2), 2)) + 0.1 * normal(25, (3, 4, 3, 2))
    cp = linalg.cp_als(jax.random.key(1), x, 2, iters=200, tol=1e-4)
    t = int(cp.num_iters)
    assert 1 < t < 200
    assert bool(jnp.all(jnp.isnan(cp.rel_errors[t:]))) and bool(jnp.all(jnp.isfinite(cp.rel_errors[:t])))
    assert float(cp.rel_errors[t - 2] - cp.rel_errors[t - 1]) < 1e-4
    assert bool(jnp.all(jnp.diff(cp.rel_errors[:t]) <= 1e-6))
    assert [f.shape for f in cp.factors] == [(3, 2), (4, 2), (3, 2), (2, 2)]
    assert float(cp.rel_errors[t - 1]) < 0.5


def test_cp_als_bad_input():
    # same shapes and static arguments as the recovery test: one compilation
    zero = linalg.cp_als(jax.random.key(0), np.zeros((5, 6, 7), np.float32), 3, iters=300)
    assert float(zero.rel_errors[0]) == 0.0 and bool(jnp.all(jnp.isfinite(zero.weights)))
    nan = linalg.cp_als(jax.random.key(0), np.full((5, 6, 7), np.nan, np.float32), 3, iters=300)
    assert int(nan.num_iters) == 1 and bool(jnp.isnan(nan.rel_errors[0]))
    with pytest.raises(ValueError, match="`rank` must be >= 1, got 0"):
        linalg.cp_als(jax.random.key(0), jnp.ones((2, 3)), 0)
    with pytest.raises(ValueError, match="at least 2 axes"):
        linalg.cp_als(jax.random.key(0), jnp.ones(3), 1)
    with pytest.raises(ValueError, match="one R"):
        linalg.cp_reconstruct((jnp.ones((2, 2)), jnp.ones((3, 1))))


# ---------------------------------------------------------------------------- Tucker


def test_tucker_hosvd_is_exact_at_full_ranks_with_orthogonal_factors():
    x = normal(26, (3, 4, 5))
    core, factors = linalg.tucker_hosvd(x, (3, 4, 5))
    np.testing.assert_allclose(linalg.tucker_reconstruct(core, factors), x, atol=1e-5)
    for u in factors:
        assert_orthonormal_columns(u)
        assert_orthonormal_columns(u.T)


def test_tucker_recovers_an_exactly_multilinear_low_rank_tensor():
    g = normal(27, (2, 3, 2))
    us = [jnp.linalg.qr(normal(28 + n, (size, r)))[0] for n, (size, r) in enumerate(zip((5, 6, 4), g.shape))]
    x = linalg.tucker_reconstruct(g, us)
    for method in (linalg.tucker_hosvd, functools.partial(linalg.tucker_hooi, iters=3)):
        core, factors = method(x, (2, 3, 2))
        np.testing.assert_allclose(linalg.tucker_reconstruct(core, factors), x, atol=1e-5)


def test_tucker_error_is_the_discarded_energy_and_hooi_improves_on_hosvd():
    x = normal(31, (5, 6, 4))
    ranks = (2, 3, 2)
    hosvd = linalg.tucker_hosvd(x, ranks)
    errors = {}
    for name, t in [("hosvd", hosvd)] + [(f"hooi{i}", linalg.tucker_hooi(x, ranks, iters=i)) for i in (1, 2, 8)]:
        for u in t.factors:
            assert_orthonormal_columns(u)
        err = fro(x - linalg.tucker_reconstruct(*t))
        # orthogonal projection onto span(U_1 o ... o U_N): ||x - x_hat||^2 = ||x||^2 - ||core||^2
        np.testing.assert_allclose(err**2, fro(x) ** 2 - fro(t.core) ** 2, rtol=1e-4)
        errors[name] = err
    assert errors["hosvd"] >= errors["hooi1"] * (1 - 1e-6)
    assert errors["hooi1"] >= errors["hooi2"] * (1 - 1e-6) >= errors["hooi8"] * (1 - 1e-6) ** 2
    bound = sum(float(linalg.approximation_error(jnp.moveaxis(x, n, 0).reshape(x.shape[n], -1), r) ** 2) for n, r in enumerate(ranks))
    assert errors["hosvd"] ** 2 <= bound * (1 + 1e-5)  # De Lathauwer et al's bound
    np.testing.assert_allclose(linalg.tucker_hooi(x, ranks, iters=0).core, hosvd.core, atol=1e-6)


def test_tucker_ranks_above_the_unfolding_rank_and_bad_ranks():
    x = normal(32, (2, 2, 6))  # the mode-2 unfolding [6, 4] has rank 4
    core, factors = linalg.tucker_hosvd(x, (2, 2, 5))
    assert core.shape == (2, 2, 5) and factors[2].shape == (6, 5)
    assert_orthonormal_columns(factors[2])
    np.testing.assert_allclose(linalg.tucker_reconstruct(core, factors), x, atol=1e-5)
    with pytest.raises(ValueError, match=r"one rank per axis of x \(2, 2, 6\), got \(2, 2\)"):
        linalg.tucker_hosvd(x, (2, 2))
    with pytest.raises(ValueError, match=r"`ranks\[2\]` must be in \[1, 6\] \(axis 2 of x has size 6\), got 7"):
        linalg.tucker_hooi(x, (2, 2, 7))
    with pytest.raises(ValueError, match=r"`ranks\[0\]` must be in \[1, 2\]"):
        linalg.tucker_hosvd(x, (0, 2, 2))


# ---------------------------------------------------------------------------- Monarch


def random_monarch(seed, b, s):
    return linalg.Monarch(normal(seed, (s, b, b)), normal(seed + 1, (b, s, s)))


@pytest.mark.parametrize("b,s", [(3, 3), (2, 3), (3, 2)])
def test_monarch_dense_is_p_l_pt_r_with_the_stride_permutation(b, s):
    f = random_monarch(33, b, s)
    n = b * s
    big_l = jax.scipy.linalg.block_diag(*f.left)  # s blocks [b, b]
    big_r = jax.scipy.linalg.block_diag(*f.right)  # b blocks [s, s]
    perm = np.arange(n).reshape(s, b).T.ravel()  # (P x)[k] = x[perm[k]]: read [s, b], transpose, flatten
    p = np.eye(n, dtype=np.float32)[perm]
    np.testing.assert_allclose(linalg.monarch_dense(f), p @ big_l @ p.T @ big_r, atol=1e-5)
    x = normal(35, (4, n))
    np.testing.assert_allclose(linalg.monarch_matmul(f, x), x @ linalg.monarch_dense(f).T, atol=1e-5)
    if b == s:  # Dao et al's square case: P is its own inverse
        np.testing.assert_array_equal(p, p.T)


@pytest.mark.parametrize("b,s", [(3, 3), (2, 3)])
def test_monarch_project_recovers_monarch_matrices_and_is_idempotent(b, s):
    dense = linalg.monarch_dense(random_monarch(36, b, s))
    f = linalg.monarch_project(dense, b)
    np.testing.assert_allclose(linalg.monarch_dense(f), dense, atol=1e-4)
    w = normal(38, (b * s, b * s))
    once = linalg.monarch_project(w, b)
    twice = linalg.monarch_project(linalg.monarch_dense(once), b)
    np.testing.assert_allclose(twice.left, once.left, atol=1e-5)  # canonical signs, balanced scale: same factors
    np.testing.assert_allclose(twice.right, once.right, atol=1e-5)


def test_monarch_project_is_the_blockwise_rank_one_optimum():
    b, s = 2, 3
    n = b * s
    w = normal(39, (n, n))
    f = linalg.monarch_project(w, b)
    proj = linalg.monarch_dense(f)
    err = fro(w - proj)
    blocks = np.asarray(w, np.float64).reshape(b, s, b, s).transpose(1, 2, 0, 3)  # [u, j, b, s]
    sv = np.linalg.svd(blocks, compute_uv=False)
    np.testing.assert_allclose(err**2, np.sum(sv[..., 1:] ** 2), rtol=1e-4)
    np.testing.assert_allclose(jnp.sum((w - proj) * proj), 0.0, atol=1e-4)  # residual orthogonal to the projection
    rng = np.random.default_rng(40)
    left, right = np.asarray(f.left, np.float64), np.asarray(f.right, np.float64)
    perturbed = linalg.Monarch(left + 0.05 * rng.standard_normal((100,) + left.shape), right + 0.05 * rng.standard_normal((100,) + right.shape))
    randoms = linalg.Monarch(rng.standard_normal((100, s, b, b)), rng.standard_normal((100, b, s, s)))
    for candidates in (perturbed, randoms):
        dense = np.einsum("...uij,...jut->...iujt", *candidates).reshape(100, n, n)  # monarch_dense, in numpy
        assert np.min(np.linalg.norm(w - dense, axis=(-2, -1))) >= err * (1 - 1e-6)


def test_monarch_batches_and_validates():
    w = normal(41, (2, 4, 4))
    f = linalg.monarch_project(w, 2)
    assert f.left.shape == (2, 2, 2, 2) and f.right.shape == (2, 2, 2, 2)
    for i in range(2):
        np.testing.assert_allclose(linalg.monarch_dense(f)[i], linalg.monarch_dense(linalg.monarch_project(w[i], 2)), atol=1e-5)
    with pytest.raises(ValueError, match=r"`nblocks` must divide n = 4, got 3"):
        linalg.monarch_project(w, 3)
    with pytest.raises(ValueError, match="square"):
        linalg.monarch_project(jnp.ones((4, 6)), 2)
    with pytest.raises(ValueError, match=r"`x` must be \[\.\.\., 4\]"):
        linalg.monarch_matmul(linalg.monarch_project(w[0], 2), jnp.ones(5))
    with pytest.raises(ValueError, match="left"):
        linalg.monarch_dense(linalg.Monarch(jnp.ones((2, 2, 2)), jnp.ones((2, 3, 3))))


# ---------------------------------------------------------------------------- jit and dtypes


def test_everything_traces_under_jit_and_integer_input_becomes_float32():
    w = normal(42, (6, 4))
    key = jax.random.key(0)
    calls = {
        "svd": (lambda w: linalg.svd(w, 2), w),
        "randomized_svd": (lambda w: linalg.randomized_svd(key, w, 2), w),
        "best_rank_r": (lambda w: linalg.best_rank_r(w, 2), w),
        "approximation_error": (lambda w: linalg.approximation_error(w, 2), w),
        "pinv": (linalg.pinv, w),
        "cr_product": (lambda w: linalg.cr_product(key, w, w.T, 3), w),
        "magnitude_direction": (linalg.magnitude_direction, w),
        "monarch_project": (lambda w: linalg.monarch_project(w[:4], 2), w),
        "tucker_hosvd": (lambda w: linalg.tucker_hosvd(w, (2, 2)), w),
        "cp_als": (lambda w: linalg.cp_als(key, w, 2, iters=3).weights, w),
    }
    for fn, arg in calls.values():
        jax.jit(fn).lower(arg)  # traces: no Python control flow on traced values
    ints = jnp.arange(12).reshape(4, 3)
    assert linalg.svd(ints)[1].dtype == jnp.float32
    assert linalg.pinv(ints).dtype == jnp.float32
    assert linalg.magnitude_direction(ints)[1].dtype == jnp.float32


def test_qr_equals_jnp_per_matrix_and_batches_through_lax_map():
    w = np.random.default_rng(0).standard_normal((2, 3, 9, 5)).astype(np.float32)
    q, r = linalg.qr(jnp.asarray(w))
    assert q.shape == (2, 3, 9, 5) and r.shape == (2, 3, 5, 5)
    q0, r0 = jnp.linalg.qr(jnp.asarray(w[1, 2]))
    np.testing.assert_allclose(q[1, 2], q0, atol=1e-6)
    np.testing.assert_allclose(r[1, 2], r0, atol=1e-6)


def test_reduced_svd_equals_jnp_per_matrix_and_runs_one_matrix_per_lapack_call_on_cpu():
    w = np.random.default_rng(1).standard_normal((2, 3, 9, 5)).astype(np.float32)
    u, s, vh = linalg.reduced_svd(jnp.asarray(w))
    assert u.shape == (2, 3, 9, 5) and s.shape == (2, 3, 5) and vh.shape == (2, 3, 5, 5)
    u0, s0, vh0 = jnp.linalg.svd(jnp.asarray(w[1, 2]), full_matrices=False)
    np.testing.assert_allclose(s[1, 2], s0, atol=1e-5)
    np.testing.assert_allclose(u[1, 2] * s[1, 2] @ vh[1, 2], w[1, 2], atol=1e-5)
    np.testing.assert_allclose(np.abs(u[1, 2]), np.abs(u0), atol=1e-5)
    np.testing.assert_allclose(np.abs(vh[1, 2]), np.abs(vh0), atol=1e-5)
    hlo = jax.jit(linalg.reduced_svd).lower(jnp.asarray(w)).as_text()
    calls = [line for line in hlo.splitlines() if "lapack_sgesdd" in line]
    assert len(calls) == 1 and 'num_batch_dims = "0"' in calls[0], calls  # jnp.linalg.svd's has "2"


def test_several_stacked_qrs_in_one_program_do_not_deadlock():
    """jax 0.10.2 on CPU: four batched [2, 576, 576] jnp.linalg.qr calls in one jit never return;
    lrj.linalg.qr (and the offset inits and randomized SVD built on it) must."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent('''
        import jax, jax.numpy as jnp, lowrank_jax as lrj
        ws = [jax.random.normal(jax.random.key(i), (2, 576, 576)) for i in range(4)]
        jax.block_until_ready(jax.jit(lambda ws: [lrj.linalg.qr(w)[0] for w in ws])(ws))
        params = {"params": {f"k{i}": {"kernel": w} for i, w in enumerate(ws)}}
        adapter = lrj.lora(rank=8, targets=".*", init="pissa_niter_2", layouts=lambda p, l: lrj.Layout(1, 1))
        jax.block_until_ready(jax.jit(adapter.init)(jax.random.key(0), params))
        print("done")
    ''')
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "done" in out.stdout, out.stderr[-2000:]


def test_check_finite_skips_a_closed_over_array_inside_a_trace():
    params = {"kernel": jax.random.normal(jax.random.key(0), (6, 4))}
    adapter = lrj.lora(rank=2, targets="kernel", init="pissa")
    traced = jax.jit(lambda k: adapter.init(k, params))(jax.random.key(1))  # raised ConcretizationTypeError
    eager = adapter.init(jax.random.key(1), params)
    np.testing.assert_allclose(traced["kernel"]["b"], eager["kernel"]["b"], atol=1e-5)
    with pytest.raises(ValueError, match=r"has 1 NaN and 0 Inf entries"):
        lrj.linalg.check_finite(params["kernel"].at[0, 0].set(jnp.nan), "w")
