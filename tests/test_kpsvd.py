"""The Kronecker identities of kpsvd.py, on random shapes (square and not, factors of 1), float64."""
import itertools
import warnings

import pytest
import torch

from kpsvd import factor_shape, kpsvd, kron_apply, kron_sum, rearrange, unrearrange

# (m, n, p, q): square, m ≠ p, n ≠ q, factors of 1 on either side
SHAPES = [(3, 3, 3, 3), (2, 5, 4, 3), (5, 2, 3, 4), (1, 4, 6, 2), (4, 1, 2, 6), (3, 2, 1, 1),
          (1, 1, 5, 3), (6, 7, 2, 3)]
ids = [f"m{m}n{n}p{p}q{q}" for m, n, p, q in SHAPES]


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def random_kron_sum(r, m, n, p, q, seed):
    U, V = rand(r, m, n, seed=seed), rand(r, p, q, seed=seed + 1)
    return sum(torch.kron(U[k], V[k]) for k in range(r)), U, V


# ----------------------------------------------------------------------------- identities

@pytest.mark.parametrize("m,n,p,q", SHAPES, ids=ids)
def test_kron_matvec_identity(m, n, p, q):
    # (U ⊗ V) vec(X) = vec(U X Vᵀ) with row-major vec (torch's reshape)
    U, V, X = rand(m, n, seed=1), rand(p, q, seed=2), rand(n, q, seed=3)
    lhs = torch.kron(U, V) @ X.reshape(-1)
    rhs = (U @ X @ V.T).reshape(-1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m,n,p,q", SHAPES, ids=ids)
def test_rearrange_of_kron_is_outer_product(m, n, p, q):
    U, V = rand(m, n, seed=4), rand(p, q, seed=5)
    R = rearrange(torch.kron(U, V), m, n, p, q)
    assert R.shape == (m * n, p * q)
    torch.testing.assert_close(R, torch.outer(U.reshape(-1), V.reshape(-1)), rtol=0, atol=0)


@pytest.mark.parametrize("m,n,p,q", SHAPES, ids=ids)
def test_rearrange_is_an_isometry_and_unrearrange_inverts_it(m, n, p, q):
    W = rand(m * p, n * q, seed=6)
    R = rearrange(W, m, n, p, q)
    torch.testing.assert_close(torch.linalg.norm(R), torch.linalg.norm(W), rtol=1e-15, atol=0)
    assert torch.equal(torch.sort(R.reshape(-1)).values, torch.sort(W.reshape(-1)).values)  # a permutation
    assert torch.equal(unrearrange(R, m, n, p, q), W)
    assert torch.equal(rearrange(unrearrange(R, m, n, p, q), m, n, p, q), R)


def test_rearrange_entrywise_definition():
    # R(W)[a·n + i, b·q + j] = W[a·p + b, i·q + j], checked entry by entry
    m, n, p, q = 2, 3, 4, 5
    W = rand(m * p, n * q, seed=7)
    R = rearrange(W, m, n, p, q)
    for a, b, i, j in itertools.product(range(m), range(p), range(n), range(q)):
        assert R[a * n + i, b * q + j] == W[a * p + b, i * q + j]


@pytest.mark.parametrize("m,n,p,q", [(2, 5, 4, 3), (3, 2, 2, 4)])
def test_column_major_convention_is_caught(m, n, p, q):
    """A column-major vec (Fortran order) is the classic mix-up: it gives a different matrix, and
    factors read back from it in that convention do not rebuild W."""
    U, V = rand(m, n, seed=8), rand(p, q, seed=9)
    R = rearrange(torch.kron(U, V), m, n, p, q)
    colmajor = torch.outer(U.T.reshape(-1), V.T.reshape(-1))        # vec in column-major order
    assert not torch.allclose(R, colmajor)
    # The wrong reshape of a correct singular vector also fails to rebuild the product.
    sigma, Uk, Vk = kpsvd(torch.kron(U, V), m, n, p, q, rank=1)
    wrong_U = Uk[0].reshape(-1).reshape(n, m).T.contiguous()                    # column-major unvec
    if m > 1 and n > 1:
        assert not torch.allclose(sigma[0] * torch.kron(wrong_U, Vk[0]), torch.kron(U, V))
    torch.testing.assert_close(sigma[0] * torch.kron(Uk[0], Vk[0]), torch.kron(U, V))


# ----------------------------------------------------------------------------- KPSVD

@pytest.mark.parametrize("m,n,p,q", SHAPES, ids=ids)
def test_exact_recovery_of_a_kronecker_sum(m, n, p, q):
    K = min(m * n, p * q)
    for r in sorted({1, max(1, K // 2), max(1, K - 1)}):
        W, _, _ = random_kron_sum(r, m, n, p, q, seed=10 + r)
        sigma, U, V = kpsvd(W, m, n, p, q)
        assert sigma.shape == (K,) and U.shape == (K, m, n) and V.shape == (K, p, q)
        torch.testing.assert_close(kron_sum(sigma[:r], U[:r], V[:r]), W, rtol=1e-10, atol=1e-10)
        if r < K:
            assert sigma[r] <= 1e-10 * sigma[0]                      # σ_{r+1} ≈ 0


@pytest.mark.parametrize("m,n,p,q", SHAPES, ids=ids)
def test_truncation_error_equals_tail_energy(m, n, p, q):
    W = rand(m * p, n * q, seed=20)
    sigma, U, V = kpsvd(W, m, n, p, q)
    torch.testing.assert_close((sigma ** 2).sum(), (W ** 2).sum())  # ‖R(W)‖_F = ‖W‖_F
    for r in range(1, sigma.numel() + 1):
        err2 = ((W - kron_sum(sigma[:r], U[:r], V[:r])) ** 2).sum()
        torch.testing.assert_close(err2, (sigma[r:] ** 2).sum(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("m,n,p,q", SHAPES, ids=ids)
def test_factors_are_orthonormal_and_sorted(m, n, p, q):
    sigma, U, V = kpsvd(rand(m * p, n * q, seed=21), m, n, p, q)
    K = sigma.numel()
    eye = torch.eye(K, dtype=torch.float64)
    torch.testing.assert_close(U.reshape(K, -1) @ U.reshape(K, -1).T, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(V.reshape(K, -1) @ V.reshape(K, -1).T, eye, rtol=0, atol=1e-12)
    assert (sigma[:-1] >= sigma[1:]).all() and (sigma >= 0).all()


def test_rank_argument_truncates_the_exact_svd():
    W = rand(12, 20, seed=22)
    full = kpsvd(W, 3, 4, 4, 5)
    top = kpsvd(W, 3, 4, 4, 5, rank=3)
    for a, b in zip(full, top):
        torch.testing.assert_close(a[:3], b)


def test_no_random_kronecker_sum_beats_the_truncation():
    """Property: over many random r-term Kronecker sums (and random perturbations of the optimum),
    none comes closer to W than the truncated KPSVD."""
    g = torch.Generator().manual_seed(23)
    for trial in range(60):
        m, n, p, q = (int(v) for v in torch.randint(1, 5, (4,), generator=g))
        K = min(m * n, p * q)
        r = int(torch.randint(1, K + 1, (1,), generator=g))
        W = torch.randn(m * p, n * q, generator=g, dtype=torch.float64)
        sigma, U, V = kpsvd(W, m, n, p, q, rank=r)
        best = torch.linalg.norm(W - kron_sum(sigma, U, V))
        for _ in range(5):
            A = torch.randn(r, m, n, generator=g, dtype=torch.float64)
            B = torch.randn(r, p, q, generator=g, dtype=torch.float64)
            s = torch.randn(r, generator=g, dtype=torch.float64)
            assert torch.linalg.norm(W - kron_sum(s, A, B)) >= best - 1e-12
            eps = 1e-3
            near = kron_sum(sigma + eps * s, U + eps * A, V + eps * B)      # close to the optimum
            assert torch.linalg.norm(W - near) >= best - 1e-12


@pytest.mark.parametrize("m,n,p,q", SHAPES, ids=ids)
def test_kron_apply_equals_dense_product(m, n, p, q):
    r = min(3, m * n, p * q)
    sigma, U, V = rand(r, seed=30), rand(r, m, n, seed=31), rand(r, p, q, seed=32)
    x = rand(2, 5, n * q, seed=33)                                     # extra leading dims
    y = kron_apply(x, sigma, U, V)
    assert y.shape == (2, 5, m * p)
    torch.testing.assert_close(y, x @ kron_sum(sigma, U, V).T, rtol=1e-12, atol=1e-12)


def test_kron_sum_matches_torch_kron():
    sigma, U, V = rand(3, seed=34), rand(3, 2, 5, seed=35), rand(3, 4, 3, seed=36)
    dense = sum(sigma[k] * torch.kron(U[k], V[k]) for k in range(3))
    torch.testing.assert_close(kron_sum(sigma, U, V), dense, rtol=1e-13, atol=1e-13)


# ----------------------------------------------------------------------------- dtypes, devices

@pytest.mark.parametrize("dtype,out", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                       (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_dtypes(dtype, out):
    W = rand(24, 20, seed=40)
    sigma, U, V = kpsvd(W.to(dtype), 4, 4, 6, 5)
    assert sigma.dtype == U.dtype == V.dtype == out
    # float32 SVD of the rounded weight reconstructs the rounded weight to float32 precision
    torch.testing.assert_close(kron_sum(sigma, U, V), W.to(dtype).to(out), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_matches_cpu():
    W = rand(24, 20, seed=41).float()
    s_cpu, _, _ = kpsvd(W, 4, 4, 6, 5)
    s_gpu, U, V = kpsvd(W.cuda(), 4, 4, 6, 5)
    assert U.is_cuda
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- randomized path

def decaying(d_out, d_in, m, n, p, q, *, alpha, seed, dtype=torch.float64):
    """A matrix whose Kronecker spectrum decays as k^-alpha (random orthonormal factors)."""
    g = torch.Generator().manual_seed(seed)
    K = min(m * n, p * q)
    Qu, _ = torch.linalg.qr(torch.randn(m * n, K, generator=g, dtype=dtype))
    Qv, _ = torch.linalg.qr(torch.randn(p * q, K, generator=g, dtype=dtype))
    s = torch.arange(1, K + 1, dtype=dtype) ** -alpha
    return unrearrange((Qu * s) @ Qv.T, m, n, p, q)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_randomized_matches_exact_top_components(alpha):
    m, n, p, q = 8, 12, 16, 6
    W = decaying(m * p, n * q, m, n, p, q, alpha=alpha, seed=50)
    for r in (1, 4, 8):
        s_e, U_e, V_e = kpsvd(W, m, n, p, q, rank=r)
        s_r, U_r, V_r = kpsvd(W, m, n, p, q, rank=r, randomized=True, seed=0)
        err_e = torch.linalg.norm(W - kron_sum(s_e, U_e, V_e))
        err_r = torch.linalg.norm(W - kron_sum(s_r, U_r, V_r))
        assert err_r <= err_e * (1 + 1e-3)
        torch.testing.assert_close(s_r, s_e, rtol=1e-6, atol=0)
        # largest principal angle between the top-r subspaces of vec(U) (and of vec(V))
        for A, B in ((U_e, U_r), (V_e, V_r)):
            cos = torch.linalg.svdvals(A.reshape(r, -1) @ B.reshape(r, -1).T)
            assert cos.min() > 1 - 1e-6


def test_randomized_is_deterministic_for_a_seed():
    W = decaying(48, 48, 6, 8, 8, 6, alpha=0.5, seed=51)
    a = kpsvd(W, 6, 8, 8, 6, rank=5, randomized=True, seed=3)
    b = kpsvd(W, 6, 8, 8, 6, rank=5, randomized=True, seed=3)
    c = kpsvd(W, 6, 8, 8, 6, rank=5, randomized=True, seed=4, n_iter=0, oversample=0)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[1], c[1])                 # another seed (and no iterations) differs


def test_randomized_needs_rank():
    with pytest.raises(ValueError, match="rank"):
        kpsvd(rand(8, 8, seed=52), 2, 2, 4, 4, randomized=True)


# ----------------------------------------------------------------------------- factor shapes

@pytest.mark.parametrize("d,split", [(4096, (64, 64)), (11008, (86, 128)), (576, (24, 24)),
                                     (192, (12, 16)), (1536, (32, 48)), (12, (3, 4)), (1, (1, 1))])
def test_factor_shape_rule(d, split):
    m, n, p, q = factor_shape(d, d)
    assert (m, p) == split and (n, q) == split


def test_factor_shape_llama_ffn():
    assert factor_shape(11008, 4096) == (86, 64, 128, 64)
    assert factor_shape(4096, 11008) == (64, 86, 64, 128)


def test_factor_shape_prime_warns():
    with pytest.warns(UserWarning, match="prime"):
        assert factor_shape(4099, 4096) == (1, 64, 4099, 64)
    for d in (2, 3):                                         # the smallest primes too (docs/method.md)
        with pytest.warns(UserWarning, match=f"d_in = {d} is prime"):
            assert factor_shape(4, d) == (2, 1, 2, d)


# ----------------------------------------------------------------------------- bad input

def test_errors_name_the_problem():
    W = rand(12, 20, seed=60)
    with pytest.raises(ValueError, match="^kpsvd.py: d_out = 12 does not factor"):
        kpsvd(W, 5, 4, 3, 5)
    with pytest.raises(ValueError, match="d_in = 20 does not factor"):
        kpsvd(W, 3, 3, 4, 5)
    with pytest.raises(ValueError, match="2-D"):
        kpsvd(rand(2, 12, 20, seed=61), 3, 4, 4, 5)
    with pytest.raises(ValueError, match="2-D"):
        rearrange(rand(12, seed=62), 3, 1, 4, 1)
    with pytest.raises(ValueError, match="Kronecker rank"):
        kpsvd(W, 3, 4, 4, 5, rank=13)
    with pytest.raises(ValueError, match="positive int"):
        kpsvd(W, 3, 4, 4, 5, rank=0)
    with pytest.raises(ValueError, match="oversample and n_iter must be ints ≥ 0"):
        kpsvd(W, 3, 4, 4, 5, rank=2, randomized=True, oversample=-5)
    for bad in (float("nan"), float("inf")):
        Wb = W.clone()
        Wb[2, 3] = bad
        with pytest.raises(ValueError, match="NaN"):
            kpsvd(Wb, 3, 4, 4, 5)
    with pytest.raises(ValueError, match="shape"):
        unrearrange(rand(12, 20, seed=63), 3, 5, 4, 4)
    with pytest.raises(ValueError, match="features"):
        kron_apply(rand(7, seed=64), rand(1, seed=65), rand(1, 2, 2, seed=66), rand(1, 3, 3, seed=67))
    with pytest.raises(ValueError, match="one r"):
        kron_sum(rand(2, seed=68), rand(3, 2, 2, seed=69), rand(3, 2, 2, seed=70))
    with pytest.raises(ValueError, match="positive int"):
        factor_shape(0, 4)


def test_prime_shape_warning_is_not_raised_for_composite():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        factor_shape(4096, 11008)
        factor_shape(1, 4)                                   # 1 is not prime: (1, 1) is its only split
