"""The SoKA layer with its Kronecker part in two Triton kernels: the fast path of SoKALinear (impl
"fused", the default on a GPU). Tested equal to the reference forward, values and gradients
(tests/test_kron_fused.py).

Per token t, with X_t = x_t.view(n, q), G_t = dy_t.view(m, p) and Us_k = σ_k U_k:

    forward   y_t  = W_res x_t  (cuBLAS)  + vec(Σ_k Us_k X_t V_kᵀ)         _kron_apply_kernel
    backward  dx_t = W_resᵀ dy_t (cuBLAS) + vec(Σ_k Us_kᵀ G_t V_k)         _kron_apply_kernel again
              dUs_k = Σ_t G_t V_k X_tᵀ  (m, n),  dV_k = Σ_t G_tᵀ Us_k X_t  (p, q)   _kron_grad_kernel
              dσ_k = Σ(dUs_k ∘ U_k),  dU_k = σ_k dUs_k

Forward and dx are one operation, out_t = Σ_k A_k X_t B_kᵀ, with (A, B) = (Us, V) resp. (Usᵀ, Vᵀ),
written first; the frozen GEMM then adds into it (addmm_, β = 1), reading it in cuBLAS's epilogue while
the GEMM is compute-bound. (Adding the kernel's sum into the GEMM's output instead costs the kernel a
read of the output too: 3 passes instead of 2, which at r = 1 is most of its time.)

Why: as batched GEMMs (autograd through kpsvd.kron_apply), the intermediate Z_t = X_t V_kᵀ, r·n·p
values per token (r times the activation), goes to memory and back several times per step.
Here each program keeps a token's small matrices (X_t, Z_t, its (m, p) accumulator) in registers and
shared memory: HBM sees each activation, output and gradient about once per kernel, and the small
factors (r·(m·n + p·q) values) are re-read from L2. docs/performance.md has the measurements.

Work per program. _kron_apply_kernel: TOKENS_PER_PROGRAM consecutive tokens (1), one after another; per
token an fp32 (p, m) accumulator, and per term k two tl.dot's, Z_tᵀ = B_k X_tᵀ then acc += Z_tᵀ A_kᵀ
(A_k, B_k re-read from L2 each time). _kron_grad_kernel: one program per (term k, chunk of tokens)
holding Us_k, V_k and the fp32 accumulators dUs_k, dV_k; per token four tl.dot's, H = G_t V_k,
dUs_k += H X_tᵀ, W = G_tᵀ Us_k, dV_k += W X_t, and at the end its chunk's shares of dσ_k, dU_k, dV_k.
Per token and term: 8 small products in all, and nothing r-sized goes to HBM.

Factor sizes are not powers of two (LLaMA-2-7B: 86, 128, 64; SmolLM2: 12, 16, 24, 32, 48), so tiles are
padded to the next power of two ≥ 16 (tl.dot's minimum) with masked loads (zeros) and masked stores.
A load vectorizes only as far as its mask stays constant, so a factor whose rows are 86 long is stored
column-major (factor_buffer); the kernels read a factor stored either way in place.
The weight gradients are summed per chunk of tokens into a float32 buffer and the chunks are added by
torch: no atomics, and the chunking depends only on the token count, r and the factor shape, so an
eager step and a CUDA-graph replay give bit-identical gradients. No autotuning (graphs are captured
after warm-up, and tuning inside a capture breaks it): fixed launch settings, measured on an H100
(below).

It runs where Triton runs: CUDA tensors, compiled; or CPU tensors under Triton's interpreter, which
TRITON_INTERPRET=1 turns on when set before this module is imported (tests/conftest.py).
"""
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

# Launch settings, the fastest of a grid measured on an H100 (benchmarks/kron_fused_configs.py, bf16,
# 4,096 tokens, LLaMA-2-7B's and SmolLM2's factor shapes, r = 1 and 8; docs/performance.md):
TOKENS_PER_PROGRAM = 1   # _kron_apply_kernel: one token a program (4 or 16 were slower)
WARPS = 4                # both kernels: one warpgroup (8 was slower)
GRAD_PROGRAMS = 256      # _kron_grad_kernel: ~r·chunks programs; 512 for factor sides below 64; fixed,
                         # so the chunking (and the summation order) depends only on N, r and the shape


@triton.jit
def _factor_tile(i_r, i_c, ROWS: tl.constexpr, COLS: tl.constexpr, TRANSPOSED: tl.constexpr, LD: tl.constexpr):
    # Offsets and mask of a (len(i_r), len(i_c)) tile of one term's factor (ROWS, COLS): its rows LD
    # apart, or if TRANSPOSED its columns (the factor stored transposed, read in place).
    if TRANSPOSED:
        off = i_r[:, None] + i_c[None, :] * LD
    else:
        off = i_r[:, None] * LD + i_c[None, :]
    return off, (i_r[:, None] < ROWS) & (i_c[None, :] < COLS)


# The loop bounds and the token count are runtime values, and not specialized on (Triton would otherwise
# compile apart r = 1, multiples of 16, ...): one compiled kernel per factor shape serves every rank and
# token count. A SmolLM2 model has ranks 1-16, and a new sequence length compiles nothing, which lets
# soka.steps.GraphedStep capture a new length without an eager warm-up pass first.
@triton.jit(do_not_specialize=["n_tokens", "R"])
def _kron_apply_kernel(out_ptr, x_ptr, a_ptr, b_ptr, n_tokens, R, TOKENS: tl.constexpr,
                       M: tl.constexpr, N: tl.constexpr, P: tl.constexpr, Q: tl.constexpr,
                       A_T: tl.constexpr, SA: tl.constexpr, LDA: tl.constexpr,
                       B_T: tl.constexpr, SB: tl.constexpr, LDB: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr,
                       ACCUMULATE: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    # out_t (M, P) = Σ_k A_k X_t B_kᵀ (+= if ACCUMULATE) for this program's TOKENS tokens; A (R, M, N),
    # X (tokens, N, Q), B (R, P, Q), out (tokens, M, P), X and out contiguous. A_k starts at
    # a_ptr + k·SA, its rows LDA apart, or if A_T its columns (A_k stored transposed); B likewise.
    # Forward: (M, N, P, Q) = (m, n, p, q); dx: (n, m, q, p), with A = Usᵀ and B = Vᵀ read from Us and
    # V as stored (no copies).
    # Computed transposed, out_tᵀ = Σ_k (B_k X_tᵀ) A_kᵀ, so that the intermediate Z_tᵀ, a dot's result
    # in registers, is the LEFT operand of the next dot (as P in flash attention's P V).
    # The rank R is a runtime loop bound (one compiled kernel serves every rank); the token loop has a
    # constexpr bound and a token past the end is masked off (its loads give zeros, its store is skipped).
    i_m, i_n, i_p, i_q = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BP), tl.arange(0, BQ)
    a_off, a_msk = _factor_tile(i_m, i_n, M, N, A_T, LDA)     # (BM, BN)
    x_off = i_n[:, None] * Q + i_q[None, :]                   # (BN, BQ)
    x_msk = (i_n[:, None] < N) & (i_q[None, :] < Q)
    b_off, b_msk = _factor_tile(i_p, i_q, P, Q, B_T, LDB)     # (BP, BQ)
    o_off = i_p[:, None] + i_m[None, :] * P                   # (BP, BM): out_tᵀ
    o_msk = (i_p[:, None] < P) & (i_m[None, :] < M)
    for i in range(TOKENS):
        t = tl.program_id(0).to(tl.int64) * TOKENS + i
        live = t < n_tokens
        X = tl.load(x_ptr + t * (N * Q) + x_off, mask=x_msk & live, other=0.0)    # (BN, BQ)
        acc = tl.zeros((BP, BM), dtype=ACC)
        for k in range(R):
            A = tl.load(a_ptr + k * SA + a_off, mask=a_msk, other=0.0)            # (BM, BN)
            B = tl.load(b_ptr + k * SB + b_off, mask=b_msk, other=0.0)            # (BP, BQ)
            Zt = tl.dot(B, tl.trans(X), input_precision=PREC, out_dtype=ACC)     # (BP, BN) = (X_t B_kᵀ)ᵀ
            acc = tl.dot(Zt.to(X.dtype), tl.trans(A), acc, input_precision=PREC, out_dtype=ACC)
        out = out_ptr + t * (M * P) + o_off
        if ACCUMULATE:
            acc += tl.load(out, mask=o_msk & live, other=0.0).to(ACC)
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=o_msk & live)


@triton.jit(do_not_specialize=["n_tokens", "CHUNK"])
def _kron_grad_kernel(part_ptr, x_ptr, g_ptr, us_ptr, v_ptr, sigma_ptr, u_ptr, n_tokens, CHUNK,
                      M: tl.constexpr, N: tl.constexpr, P: tl.constexpr, Q: tl.constexpr,
                      US_T: tl.constexpr, SU: tl.constexpr, LDU: tl.constexpr,
                      V_T: tl.constexpr, SV: tl.constexpr, LDV: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr,
                      ACC: tl.constexpr, PREC: tl.constexpr):
    # Program (k, c) sums over chunk c's CHUNK tokens (a runtime bound; past the end masked off)
    #     dUs_k = Σ_t (G_t V_k) X_tᵀ  (M, N)   and   dV_k = Σ_t (G_tᵀ Us_k) X_t  (P, Q),
    # both intermediates left operands of their second dot, and writes chunk c's share of the three
    # gradients into row c of part (chunks, R·(1 + M·N + P·Q)), laid out [dσ (R) | dU (R, M, N) | dV (R,
    # P, Q)]: dσ_k = Σ(dUs_k ∘ U_k), dU_k = σ_k dUs_k (linear in dUs_k, so the chunks' shares add up to
    # the gradient; torch adds the rows, one sum for the layer). k varies fastest across programs, so
    # the R programs of a chunk run together and read its X and G from HBM once (then from L2).
    # Us_k starts at us_ptr + k·SU, its rows LDU apart, or if US_T its columns (as in _kron_apply_kernel);
    # V likewise; σ, U, X, G and part contiguous.
    k, c = tl.program_id(0), tl.program_id(1)
    R = tl.num_programs(0)
    i_m, i_n, i_p, i_q = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BP), tl.arange(0, BQ)
    mn_off = i_m[:, None] * N + i_n[None, :]                  # (BM, BN)
    mn_msk = (i_m[:, None] < M) & (i_n[None, :] < N)
    pq_off = i_p[:, None] * Q + i_q[None, :]                  # (BP, BQ)
    pq_msk = (i_p[:, None] < P) & (i_q[None, :] < Q)
    x_off = i_n[:, None] * Q + i_q[None, :]                   # (BN, BQ)
    x_msk = (i_n[:, None] < N) & (i_q[None, :] < Q)
    g_off = i_m[:, None] * P + i_p[None, :]                   # (BM, BP)
    g_msk = (i_m[:, None] < M) & (i_p[None, :] < P)
    us_off, _ = _factor_tile(i_m, i_n, M, N, US_T, LDU)       # (BM, BN); its mask is mn_msk
    v_off, _ = _factor_tile(i_p, i_q, P, Q, V_T, LDV)         # (BP, BQ); its mask is pq_msk
    Us = tl.load(us_ptr + k * SU + us_off, mask=mn_msk, other=0.0)               # (BM, BN)
    V = tl.load(v_ptr + k * SV + v_off, mask=pq_msk, other=0.0)                  # (BP, BQ)
    dUs = tl.zeros((BM, BN), dtype=ACC)
    dV = tl.zeros((BP, BQ), dtype=ACC)
    for i in range(CHUNK):
        t = c.to(tl.int64) * CHUNK + i
        X = tl.load(x_ptr + t * (N * Q) + x_off, mask=x_msk & (t < n_tokens), other=0.0)   # (BN, BQ)
        G = tl.load(g_ptr + t * (M * P) + g_off, mask=g_msk & (t < n_tokens), other=0.0)   # (BM, BP)
        H = tl.dot(G, V, input_precision=PREC, out_dtype=ACC)                    # (BM, BQ) = G_t V_k
        dUs = tl.dot(H.to(X.dtype), tl.trans(X), dUs, input_precision=PREC, out_dtype=ACC)
        W = tl.dot(tl.trans(G), Us, input_precision=PREC, out_dtype=ACC)         # (BP, BN) = G_tᵀ Us_k
        dV = tl.dot(W.to(X.dtype), X, dV, input_precision=PREC, out_dtype=ACC)
    U = tl.load(u_ptr + k * (M * N) + mn_off, mask=mn_msk, other=0.0).to(ACC)   # the factors as trained
    sigma = tl.load(sigma_ptr + k).to(ACC)
    row = part_ptr + c.to(tl.int64) * (R * (1 + M * N + P * Q))
    tl.store(row + k, tl.sum(tl.sum(dUs * U, axis=1), axis=0))                   # dσ_k's share
    tl.store(row + R + k * (M * N) + mn_off, sigma * dUs, mask=mn_msk)            # dU_k's share
    tl.store(row + R + R * (M * N) + k * (P * Q) + pq_off, dV, mask=pq_msk)       # dV_k's share


# -----------------------------------------------------------------------------
# launching

INTERPRETED = not isinstance(_kron_apply_kernel, triton.runtime.JITFunction)   # TRITON_INTERPRET=1 at import


def _side(d):
    """A tile side: the next power of two ≥ 16 (tl.dot's smallest)."""
    return max(16, triton.next_power_of_2(d))


def _stages(dtype, side, *, grads=False):
    """Loads in flight per loop (software pipelining) for tiles whose largest side is `side`: 2 for the
    sums; 3 for the gradients, but 2 from side 128 on (LLaMA-2-7B's FFN factors: 3 was slower);
    1 in float64, whose tiles are 4x bf16's (shared memory: 228 KB on an H100)."""
    if dtype == torch.float64:
        return 1
    return 3 if grads and side < 128 else 2


def _dot_options(dtype):
    """Accumulator dtype and tl.dot input precision. float32 dots follow torch's TF32 switch for
    matmuls, as the frozen GEMM does (default off: exact "ieee"); bf16 dots accumulate in float32."""
    if dtype == torch.float64:
        return tl.float64, "ieee"
    if dtype == torch.float32:
        return tl.float32, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return tl.float32, "tf32"                                  # Triton's default; unused by 16-bit dots


def _operands(*ts):
    """The tensors as the kernels get them. Triton 3.5's interpreter multiplies bf16 tiles as their raw
    uint16 bits, so on it bf16 operands go as float32 copies: bf16 products are exact in float32 and
    the accumulation is float32 either way (only the intermediates Z, H, W skip their bf16 rounding)."""
    if ts[0].device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"kron_fused.py: impl 'fused' runs Triton kernels on CUDA tensors, got a "
                         f"{ts[0].device.type} tensor (CPU only under TRITON_INTERPRET=1, set before "
                         f"soka.kron_fused is imported)")
    if INTERPRETED and ts[0].dtype == torch.bfloat16:
        ts = tuple(t.float() for t in ts)
    return ts


def _check_tiles(dtype, side):
    if not INTERPRETED and dtype == torch.float64 and side > 64:
        raise ValueError(f"kron_fused.py: float64 tiles of side {side} need more shared memory than a GPU "
                         f"has; SoKALinear runs float64 layers through its reference forward instead")


def _device(t):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else nullcontext()


def _vector_bytes(d, dtype):
    """Widest load (≤ 16 bytes) that a masked row of d values allows: Triton vectorizes a load only as
    far as its mask is constant, i.e. up to the largest power of two dividing d (times the item size)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return min(16, (d * itemsize) & -(d * itemsize))


def factor_buffer(r, rows, cols, *, dtype, device):
    """An uninitialized (r, rows, cols) tensor for a factor the kernels read: contiguous, or the
    transposed view of a contiguous (r, cols, rows) one where a row of `cols` values loads in narrower
    vectors than a column of `rows` (LLaMA-2-7B's FFN factors of side 86: 4-byte loads instead of 16;
    stored as rows of 86, the 4096×11008 layer's forward and dx ran markedly slower). The
    kernels read either in place, the transposed one in dx too."""
    if _vector_bytes(cols, dtype) < _vector_bytes(rows, dtype):
        return torch.empty(r, cols, rows, dtype=dtype, device=device).transpose(1, 2)
    return torch.empty(r, rows, cols, dtype=dtype, device=device)


def _layout(A):
    """(A, transposed, term stride, row stride) as the kernels read A (r, M, N): contiguous, or the
    transposed view of a contiguous tensor (read in place); anything else as a contiguous copy."""
    if not (A.is_contiguous() or A.transpose(1, 2).is_contiguous()):
        A = A.contiguous()
    if A.is_contiguous():
        return A, False, A.stride(0), A.stride(1)
    return A, True, A.stride(0), A.stride(2)


def kron_apply_(out, X, A, B, *, accumulate=True, tokens=None, warps=None, stages=None):
    """out (n_tok, M·P) += Σ_k A_k X_t B_kᵀ for every token t, in place (= if not accumulate), with
    X_t = X[t].view(N, Q), X (n_tok, N·Q), A (r, M, N), B (r, P, Q); out and X contiguous; A and B
    contiguous, or transposed views of contiguous tensors (factor_buffer(), dx's Usᵀ), read in place;
    anything else is copied. Returns out. tokens / warps / stages override TOKENS_PER_PROGRAM, WARPS and _stages
    (benchmarks/kron_fused_configs.py)."""
    r, M, N = A.shape
    _, P, Q = B.shape
    n_tok = X.shape[0]
    if n_tok == 0 or r == 0:
        return out if accumulate else out.zero_()
    X, A, B = _operands(X, A, B)
    (A, a_t, sa, lda), (B, b_t, sb, ldb) = _layout(A), _layout(B)
    acc, prec = _dot_options(X.dtype)
    BM, BN, BP, BQ = _side(M), _side(N), _side(P), _side(Q)
    _check_tiles(X.dtype, max(BM, BN, BP, BQ))
    tokens = tokens or TOKENS_PER_PROGRAM
    with _device(out):
        _kron_apply_kernel[(triton.cdiv(n_tok, tokens),)](
            out, X, A, B, n_tok, r, tokens, M, N, P, Q, a_t, sa, lda, b_t, sb, ldb, BM, BN, BP, BQ, accumulate,
            acc, prec,
            num_warps=warps or WARPS, num_stages=stages or _stages(X.dtype, max(BM, BN, BP, BQ)))
    return out


def kron_grads(X, G, Us, V, sigma, U, *, programs=None, warps=None, stages=None):
    """(dσ (r,), dU (r, m, n), dV (r, p, q)) of the loss through Σ_k σ_k U_k X_t V_kᵀ, given X (N, n·q)
    and G = ∂L/∂y (N, m·p) contiguous, the factors as the dots take them (Us = σ U and V, in X's dtype,
    as factor_buffer() gives them) and as trained (σ, U), in float32 (float64 for float64 inputs):
    dUs_k = Σ_t G_t V_k X_tᵀ, dσ_k = Σ(dUs_k ∘ U_k), dU_k = σ_k dUs_k, dV_k = Σ_t G_tᵀ Us_k X_t.
    Each chunk of tokens writes one row of partial sums and torch adds the rows (one sum, in a fixed
    order; the three results are views of it). Chunk length: ⌈N / ⌊programs / r⌋⌉ tokens, with
    programs = GRAD_PROGRAMS (twice that for factor sides below 64). programs / warps / stages
    override that, WARPS and _stages (benchmarks/kron_fused_configs.py)."""
    r, m, n = Us.shape
    _, p, q = V.shape
    n_tok = X.shape[0]
    side = max(_side(d) for d in (m, n, p, q))
    _check_tiles(X.dtype, side)
    programs = programs or (GRAD_PROGRAMS if side >= 64 else 2 * GRAD_PROGRAMS)
    chunk = max(1, triton.cdiv(n_tok, max(1, programs // r)))
    chunks = triton.cdiv(n_tok, chunk)
    X, G, Us, V = _operands(X, G, Us, V)
    (Us, us_t, su, ldu), (V, v_t, sv, ldv) = _layout(Us), _layout(V)
    acc, prec = _dot_options(X.dtype)
    dtype = torch.float64 if acc == tl.float64 else torch.float32
    row = r * (1 + m * n + p * q)                         # one chunk's partial sums: [dσ | dU | dV]
    if not (chunks and r):                                # no tokens: zero gradients
        part = torch.zeros(1, row, dtype=dtype, device=X.device)
    else:
        part = torch.empty(chunks, row, dtype=dtype, device=X.device)   # every value written by a program
        BM, BN, BP, BQ = _side(m), _side(n), _side(p), _side(q)
        with _device(X):
            _kron_grad_kernel[(r, chunks)](part, X, G, Us, V, sigma.contiguous(), U.contiguous(), n_tok, chunk,
                                           m, n, p, q, us_t, su, ldu, v_t, sv, ldv, BM, BN, BP, BQ, acc, prec,
                                           num_warps=warps or WARPS,
                                           num_stages=stages or _stages(X.dtype, side, grads=True))
    dsigma, dU, dV = part.sum(0).split([r, r * m * n, r * p * q])     # one sum, in chunk order
    return dsigma, dU.view(r, m, n), dV.view(r, p, q)


# -----------------------------------------------------------------------------
# the layer

def _compute_dtype(x):
    """The dtype the GEMMs run in: autocast's when it is on for x's device, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def _flat_input(x, n, q):
    """x (..., n·q) as X (N, n·q), contiguous, in the GEMMs' dtype (one cast at most, not one per GEMM)."""
    if x.shape[-1] != n * q:
        raise ValueError(f"kron_fused.py: x has {x.shape[-1]} features, the factors expect n·q = {n}·{q}")
    return x.reshape(-1, n * q).to(_compute_dtype(x)).contiguous()


class KronFused(torch.autograd.Function):
    """y = x W_resᵀ + Σ_k σ_k U_k X V_kᵀ: SoKALinear's function (weight = W_res, factors float32), with
    the Kronecker part in the kernels above. Saves X, the frozen weight, the factors and their cast
    copies Us, V (r·(m·n + p·q) values), nothing per token beyond X."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")   # backward runs under forward's autocast state
    def forward(ctx, x, weight, sigma, U, V):
        r, m, n = U.shape
        _, p, q = V.shape
        X = _flat_input(x, n, q)                              # (N, n·q)
        dt = X.dtype
        Us = factor_buffer(r, m, n, dtype=dt, device=x.device)
        torch.mul(U, sigma[:, None, None], out=Us)            # Us_k = σ_k U_k (r, m, n), cast on write
        Vd = factor_buffer(r, p, q, dtype=dt, device=x.device).copy_(V)   # (r, p, q)
        y = torch.empty(X.shape[0], m * p, dtype=dt, device=x.device)
        kron_apply_(y, X, Us, Vd, accumulate=False)          # (N, m·p) = Σ_k Us_k X_t V_kᵀ, then ...
        y.addmm_(X, weight.to(dt).t())                        # ... += X W_resᵀ: cuBLAS adds y in its epilogue
        ctx.save_for_backward(X, weight, sigma, U, Us, Vd)
        ctx.x_dtype = x.dtype
        return y.view(*x.shape[:-1], m * p)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, gy):
        X, weight, sigma, U, Us, Vd = ctx.saved_tensors
        r, m, n = U.shape
        _, p, q = Vd.shape
        G = gy.reshape(-1, m * p).to(Us.dtype).contiguous()   # (N, m·p)
        dx = dweight = dsigma = dU = dV = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty(G.shape[0], n * q, dtype=Us.dtype, device=G.device)
            kron_apply_(dx, G, Us.transpose(1, 2), Vd.transpose(1, 2), accumulate=False)  # Σ_k Us_kᵀ G_t V_k
            dx.addmm_(G, weight.to(Us.dtype))                 # += G W_res (the frozen part)
            dx = dx.view(*gy.shape[:-1], n * q).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:                           # W_res is frozen in SoKALinear; for completeness
            dweight = (G.T @ X).to(weight.dtype)
        if any(ctx.needs_input_grad[2:]):
            dsigma, dU, dV = kron_grads(X, G, Us, Vd, sigma, U)   # float32: views of one sum
            dsigma, dU, dV = dsigma.to(sigma.dtype), dU.to(U.dtype), dV.to(U.dtype)   # no-ops for fp32 factors
        return dx, dweight, dsigma, dU, dV
