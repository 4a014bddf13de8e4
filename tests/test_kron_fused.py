"""soka/kron_fused.py, the fast path: KronFused equals the reference forward F.linear(x, W_res) +
kron_apply(x, σ, U, V) (values and all five gradients) and the dense layer, for factor sizes that are
not powers of two, token counts that leave blocks and chunks part-full, and one token; it is
deterministic; SoKALinear(impl="fused") trains a model as impl "reference" does.
Without CUDA the kernels run under Triton's interpreter on CPU; with CUDA they are compiled and these
tests run on the GPU, plus bf16 autocast at LLaMA-2-7B shapes and a CUDA-graph replay.

    OMP_NUM_THREADS=2 python -m pytest -q tests/test_kron_fused.py      # CPU: the interpreter
    python -m pytest -q tests/test_kron_fused.py                         # a CUDA machine: compiled
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

# Triton decides between compiling a kernel and interpreting it (numpy, on CPU) from TRITON_INTERPRET,
# read once; tests/conftest.py sets it before any test module imports triton. Set here too, for a
# run of this file outside pytest's conftest (python -c "import tests.test_kron_fused"). With CUDA we
# leave it alone.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if sys.platform != "linux":   # triton publishes wheels for Linux only; elsewhere the fused path cannot run
    pytest.skip("triton does not install on this platform (Linux only)", allow_module_level=True)
import triton  # noqa: E402,F401  (requirements-dev.txt)

from kpsvd import factor_shape, kron_apply, kron_sum            # noqa: E402
from model import ModelArgs, Transformer                        # noqa: E402
from soka import inject, kron_fused                             # noqa: E402
from soka.adapters import SoKALinear, adapter_layers            # noqa: E402
from soka.kron_fused import KronFused                           # noqa: E402

DEVICE = "cpu" if kron_fused.INTERPRETED else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("test_kron_fused.py: soka.kron_fused was imported (compiled) before this module "
                       "could set TRITON_INTERPRET=1; set it in the environment")

# (m, n, p, q): SmolLM2's 576², 192×576 and 1536×576 layers, LLaMA-2-7B's 11008×4096, and odd sides
# (rows of 7 or 3 values load in narrower vectors than columns of 8 or 6: those factors are stored
# transposed, kron_fused.factor_buffer)
SHAPES = [(24, 24, 24, 24), (12, 24, 16, 24), (32, 24, 48, 24), (86, 64, 128, 64), (8, 7, 6, 3)]
# Largest error over largest |value|. The two paths sum the same products in another order
# (float32 dots are exact "ieee" ones, no TF32), so they agree to a few ulps of the result's scale.
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


class Reference:
    """SoKALinear's reference forward as a function of (x, W_res, σ, U, V), differentiated by autograd:
    the factors cast to the GEMMs' dtype, as the layer does."""

    @staticmethod
    def apply(x, W, sigma, U, V):
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return F.linear(x, W) + kron_apply(x, *(t.to(dt) for t in (sigma, U, V)))


def layer(m, n, p, q, r, dtype, *, tokens=(2, 3), seed=0):
    """x (*tokens, n·q), W (m·p, n·q), σ (r,), U (r, m, n), V (r, p, q), gy (*tokens, m·p), O(1) values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, n * q, generator=g)
    W = torch.randn(m * p, n * q, generator=g) / (n * q) ** 0.5   # float32 draws: float64 ones are slow
    sigma = torch.rand(r, generator=g) + 0.5
    U = torch.randn(r, m, n, generator=g) / (m * n) ** 0.5
    V = torch.randn(r, p, q, generator=g) / (p * q) ** 0.5
    gy = torch.randn(*tokens, m * p, generator=g)
    return [t.to(DEVICE, dtype) for t in (x, W, sigma, U, V, gy)]


def run(fn, x, W, sigma, U, V, gy, wrt=(0, 1, 2, 3, 4)):
    """[y, gradients of Σ y·gy for the inputs numbered in wrt (x, W, σ, U, V)]; only those require grad."""
    leaves = [t.detach().clone().requires_grad_(i in wrt) for i, t in enumerate((x, W, sigma, U, V))]
    y = fn.apply(*leaves)
    return [y.detach(), *torch.autograd.grad((y * gy).sum(), [leaves[i] for i in wrt])]


def assert_close(got, want, tol, what=""):
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape)
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} · {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("r", [1, 3])
@pytest.mark.parametrize("m,n,p,q", SHAPES)
def test_equals_the_reference_and_the_dense_layer(m, n, p, q, r, dtype):
    x, W, sigma, U, V, gy = layer(m, n, p, q, r, dtype, seed=m + r)     # 6 tokens
    if DEVICE == "cuda" and dtype == torch.float64 and max(m, n, p, q) > 64:
        with pytest.raises(ValueError, match="shared memory"):    # 128² float64 tiles do not fit on a GPU
            run(KronFused, x, W, sigma, U, V, gy)
        return
    got = run(KronFused, x, W, sigma, U, V, gy)
    want = run(Reference, x, W, sigma, U, V, gy)
    for name, a, b in zip(("y", "dx", "dW", "dsigma", "dU", "dV"), got, want):
        assert_close(a, b, TOL[dtype], name)
    assert_close(got[0], F.linear(x, W + kron_sum(sigma, U, V)), TOL[dtype], "y vs dense")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_factor_layouts_give_the_same_sums_and_gradients(dtype):
    # The kernels read each factor contiguous or stored transposed (factor_buffer picks), and dx reads
    # the transposed views of both: all must agree with einsum.
    m, n, p, q, r, N = 8, 7, 6, 3, 2, 9
    g = torch.Generator().manual_seed(1)
    X, A, B = (torch.randn(*s, generator=g).to(DEVICE, dtype) for s in ((N, n * q), (r, m, n), (r, p, q)))
    G = torch.randn(N, m * p, generator=g).to(DEVICE, dtype)

    def stored(t):
        out = kron_fused.factor_buffer(*t.shape, dtype=t.dtype, device=t.device).copy_(t)
        assert not out.is_contiguous()                          # rows of 7 or 3: stored transposed
        return out
    want = torch.einsum("kmn,tnq,kpq->tmp", A, X.view(N, n, q), B).reshape(N, m * p)
    for a, b in ((A, B), (stored(A), stored(B)), (stored(A), B)):
        assert_close(kron_fused.kron_apply_(torch.zeros(N, m * p, device=DEVICE, dtype=dtype), X, a, b), want,
                     TOL[dtype], "forward")
    want = torch.einsum("kmn,tmp,kpq->tnq", A, G.view(N, m, p), B).reshape(N, n * q)   # Σ A_kᵀ G_t B_k
    for a, b in ((A, B), (stored(A), stored(B)), (A, stored(B))):
        got = kron_fused.kron_apply_(torch.zeros(N, n * q, device=DEVICE, dtype=dtype), G, a.transpose(1, 2),
                                   b.transpose(1, 2))
        assert_close(got, want, TOL[dtype], "dx")
    sigma = torch.rand(r, generator=g).to(DEVICE, dtype) + 0.5
    Us = sigma[:, None, None] * A
    dUs = torch.einsum("tmp,kpq,tnq->kmn", G.view(N, m, p), B, X.view(N, n, q))
    want = ((dUs * A).sum((1, 2)), sigma[:, None, None] * dUs,
            torch.einsum("tmp,kmn,tnq->kpq", G.view(N, m, p), Us, X.view(N, n, q)))
    for us, b in ((Us, B), (stored(Us), stored(B)), (Us, stored(B))):
        for name, got, w in zip(("dsigma", "dU", "dV"), kron_fused.kron_grads(X, G, us, b, sigma, A), want):
            assert_close(got, w, TOL[dtype], name)


def test_only_the_gradients_asked_for():
    # Inside SoKALinear W_res is frozen (and the first layer's x may need no gradient): then backward
    # returns None for them and the rest unchanged.
    args = layer(12, 24, 16, 24, 3, torch.float64)
    want = run(Reference, *args)
    for wrt in ((2, 3, 4), (0, 2, 3, 4), (0,)):
        got = run(KronFused, *args, wrt=wrt)
        assert len(got) == 1 + len(wrt)
        for a, i in zip(got[1:], wrt):
            assert_close(a, want[1 + i], TOL[torch.float64], f"gradient {i} of {wrt}")


@pytest.mark.parametrize("tokens", [1, 7, 13])
def test_token_counts_that_leave_blocks_and_chunks_part_full(tokens, monkeypatch):
    # With two gradient chunks per term, 7 and 13 tokens give chunks of 4 and 8 with a last one part
    # full; the forward's blocks of TOKENS_PER_PROGRAM = 4 end part full too. 1 token: one of each.
    monkeypatch.setattr(kron_fused, "GRAD_PROGRAMS", 3)       # factor sides below 64: 2 · 3 programs
    monkeypatch.setattr(kron_fused, "TOKENS_PER_PROGRAM", 4)
    args = layer(12, 24, 16, 24, 3, torch.float64, tokens=(tokens,), seed=tokens)
    for name, a, b in zip(("y", "dx", "dW", "dsigma", "dU", "dV"), run(KronFused, *args), run(Reference, *args)):
        assert_close(a, b, TOL[torch.float64], f"{name}, {tokens} tokens")


def test_bfloat16_and_autocast_within_bf16_rounding():
    # bf16 tensors, and float32 ones under bf16 autocast: y, dx and the float32 factor gradients stay
    # within 2 % of the largest float64 value (a few bf16 roundings, eps 2⁻⁸; wrong math is O(1)).
    args = layer(12, 24, 16, 24, 3, torch.float64)
    want = run(Reference, *args, wrt=(0, 2, 3, 4))
    for dtype, amp in ((torch.bfloat16, False), (torch.float32, True)):
        x, W, gy = (args[i].to(dtype) for i in (0, 1, 5))
        sigma, U, V = (t.float() for t in args[2:5])
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=amp):
            got = run(KronFused, x, W, sigma, U, V, gy, wrt=(0, 2, 3, 4))
        assert got[0].dtype == torch.bfloat16 and got[1].dtype == dtype
        assert all(g.dtype == torch.float32 for g in got[2:])
        for a, b in zip(got, want):
            assert (a.double() - b).abs().max() <= 0.02 * b.abs().max(), (dtype, amp)


def test_deterministic():
    # Partials are written to uninitialized memory and summed by torch: every element of every partial
    # must be written, and the same inputs must give the same bits.
    args = layer(32, 24, 48, 24, 3, torch.float32)
    first, second = run(KronFused, *args), run(KronFused, *args)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_soka_layers_fused_train_as_the_reference():
    # A tiny LLaMA with SoKA on all seven linear types, float64: the loss and every factor gradient of
    # impl "fused" equal impl "reference"'s.
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96, max_seq_len=64)
    tokens = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = {}
    for impl in ("reference", "fused"):
        torch.manual_seed(0)
        model = Transformer(args).to(DEVICE, torch.float64)
        inject(model, "soka", ("wq", "wk", "wv", "wo", "w1", "w2", "w3"), rank=2, impl=impl, verbose=False)
        assert {mod.impl for _, mod in adapter_layers(model)} == {impl}
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        prm = [(k, v) for k, v in model.named_parameters() if v.requires_grad]
        out[impl] = dict(zip([k for k, _ in prm], torch.autograd.grad(loss, [v for _, v in prm])), loss=loss.detach())
    assert len(out["fused"]) == 1 + 2 * 7 * 3                   # loss, and σ, U, V of 14 layers
    for k, want in out["reference"].items():
        assert_close(out["fused"][k], want, 1e-10, k)


def test_adapters_without_triton():
    # CPU installs may lack triton: soka.adapters then imports, its layers run the reference forward,
    # and impl "fused" is refused by name. (A None entry in sys.modules makes `import triton` fail.)
    code = ("import sys, torch; sys.modules['triton'] = None; "
            "from soka.adapters import SoKALinear, KronFused; assert KronFused is None; "
            "layer = SoKALinear(torch.randn(6, 4), torch.ones(1), torch.randn(1, 2, 2), torch.randn(1, 3, 2), "
            "subtract=True); layer(torch.randn(5, 4)).sum().backward()\n"
            "try:\n    SoKALinear(torch.randn(6, 4), torch.ones(1), torch.randn(1, 2, 2), torch.randn(1, 3, 2), "
            "subtract=True, impl='fused')\nexcept ValueError as e:\n    assert 'needs triton' in str(e)\n"
            "else:\n    raise AssertionError('fused accepted without triton')")
    res = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


# ----------------------------------------------------------------------------- CUDA only

cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="no CUDA device here (the compiled Triton kernels need one)")


@cuda_only
@pytest.mark.parametrize("r", [1, 8])
@pytest.mark.parametrize("d_out,d_in", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_cuda_bf16_autocast_at_llama7b_shapes(d_out, d_in, r):
    # bf16 weights and activations under bf16 autocast, as train.py runs. fused and the reference round
    # the same operands to bf16 and accumulate in float32, but not at the same places (the reference
    # rounds its intermediates to bf16 as well), so each is compared with float32 math on the same bf16
    # inputs (no autocast, no TF32): fused's largest error must be within twice the reference's plus one bf16 eps (2⁻⁸) of the
    # result's scale. Wrong indexing gives errors of the order of the scale itself. Also bit-identical
    # on a second call.
    m, n, p, q = factor_shape(d_out, d_in)
    g = torch.Generator().manual_seed(d_out + r)
    x = torch.randn(512, d_in, generator=g).to("cuda", torch.bfloat16)
    W = (torch.randn(d_out, d_in, generator=g) / d_in ** 0.5).to("cuda", torch.bfloat16)
    sigma = (torch.rand(r, generator=g) + 0.5).cuda()
    U = (torch.randn(r, m, n, generator=g) / (m * n) ** 0.5).cuda()
    V = (torch.randn(r, p, q, generator=g) / (p * q) ** 0.5).cuda()
    gy = torch.randn(512, d_out, generator=g).to("cuda", torch.bfloat16)

    def go(fn, amp):
        xx, WW = (x, W) if amp else (x.float(), W.float())
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            return [t.float() for t in run(fn, xx, WW, sigma, U, V, gy, wrt=(0, 2, 3, 4))]

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = go(Reference, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    v2, fused, again = go(Reference, True), go(KronFused, True), go(KronFused, True)
    # dσ_k = Σ dUs_k ∘ U_k sums m·n products of both signs: its rounding error scales with Σ |dUs_k ∘ U_k|
    # (the sum's condition), not with |dσ_k|, which cancellation can make small (r = 1: one number).
    dus = ref[3] / sigma[:, None, None]
    scales = dict(dsigma=(dus * U).abs().sum((1, 2)).max().item())
    for name, a, b, f, f2 in zip(("y", "dx", "dsigma", "dU", "dV"), ref, v2, fused, again):
        scale = scales.get(name, a.abs().max().item())
        e_v2, e_f = (b - a).abs().max().item(), (f - a).abs().max().item()
        assert e_f <= 2 * e_v2 + 2 ** -8 * scale, f"{name}: fused error {e_f:.3g}, reference {e_v2:.3g}, scale {scale:.3g}"
        assert torch.equal(f, f2), f"{name}: a second call differs"


@cuda_only
def test_cuda_graph_replay_equals_eager():
    # train.py replays forward + backward as a CUDA graph: the replay must give the eager step's bits.
    x, W, sigma, U, V, gy = (t.cuda() for t in layer(64, 64, 64, 64, 8, torch.float32, tokens=(1000,)))
    x, W, gy = x.bfloat16(), W.bfloat16(), gy.bfloat16()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return run(KronFused, x, W, sigma, U, V, gy, wrt=(0, 2, 3, 4))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                               # warm-up: compiles the kernels
        eager = [t.clone() for t in step()]
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, static):
        assert torch.equal(a, b)


@cuda_only
def test_cuda_auto_impl_is_fused_and_float64_is_the_reference():
    # The default impl "auto" runs KronFused on CUDA tensors; float64 layers (whose 128² tiles would
    # not fit) run the reference forward, for "fused" too: the same bits as the path each stands for.
    for dtype, same_as in ((torch.bfloat16, "fused"), (torch.float64, "reference")):
        x, W, sigma, U, V, gy = layer(86, 64, 128, 64, 2, torch.float32, tokens=(16,))
        x, W, gy = x.to(dtype), W.to(dtype), gy.to(dtype)
        outs = {}
        for impl in ("auto", "fused", same_as):
            mod = SoKALinear(W, sigma, U, V, subtract=False, impl=impl)
            xx = x.clone().requires_grad_()
            y = mod(xx)
            (y * gy).sum().backward()
            outs[impl] = [y.detach(), xx.grad, mod.sigma.grad, mod.U.grad, mod.V.grad]
        for impl in ("auto", "fused"):
            assert all(torch.equal(a, b) for a, b in zip(outs[impl], outs[same_as])), (dtype, impl)


@pytest.mark.parametrize("fn", [Reference, KronFused], ids=["reference", "fused"])
def test_wrong_input_width_is_a_clear_error(fn):
    r, m, n, p, q = 2, 4, 3, 5, 2
    U, V = torch.randn(r, m, n, device=DEVICE), torch.randn(r, p, q, device=DEVICE)
    W, sigma = torch.randn(m * p, n * q, device=DEVICE), torch.ones(r, device=DEVICE)
    if fn is Reference:                                        # the layer checks the width first
        layer = SoKALinear(W, sigma, U, V, subtract=False, impl="reference")
        with pytest.raises(ValueError, match=r"x has 7 features, the soka layer expects 6"):
            layer(torch.randn(4, 7, device=DEVICE))
        return
    with pytest.raises(ValueError, match=r"x has 7 features, the factors expect n·q = 3·2"):
        fn.apply(torch.randn(4, 7, device=DEVICE), W, sigma, U, V)
