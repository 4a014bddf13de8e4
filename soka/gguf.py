"""GGUF (llama.cpp's file format), read by hand with numpy: header, metadata, tensors, dequantization.

    gf = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    gf.metadata["llama.embedding_length"]       # 576
    gf.tensors["blk.0.attn_q.weight"]           # float32 (576, 576), dequantized on access
    params, state_dict, tokenizer = load_gguf(path)   # Meta's params.json keys and checkpoint keys

Layout (little-endian; docs/formats.md has the details):

    magic "GGUF" | version u32 (2 or 3) | n_tensors u64 | n_kv u64
    n_kv    x (key: string, value type: u32, value)      string = u64 length + UTF-8 bytes
    n_tensors x (name: string, n_dims: u32, ne: u64[n_dims], ggml type: u32, offset: u64)
    padding to `general.alignment` (default 32), then the data section; offsets count from its start

`ne[0]` is the fastest-varying dimension, so the numpy shape is `ne` reversed: a linear layer
stored with ne = (d_in, d_out) is the (d_out, d_in) matrix of `y = x Wᵀ`, as in PyTorch.
"""
import math
import numbers
import re
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from soka.tokenizer import BPETokenizer

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_ARRAY_DEPTH = 4       # metadata arrays of arrays: llama.cpp writes none deeper than 2
MAX_ARRAY_LEN = 1 << 22   # elements of one metadata array: vocabularies hold up to a few 100,000 tokens

# Metadata value types. 8 is a string, 9 an array (element type u32, count u64, elements).
# The fixed-size ones, as struct codes (numpy reads the same codes for arrays):
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# ggml tensor types, for error messages; only those in _BLOCK are dequantized here.
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
    24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0",
    35: "TQ2_0", 39: "MXFP4",
}
# type -> (values per block, bytes per block)
_BLOCK = {0: (1, 4), 1: (1, 2), 30: (1, 2), 2: (32, 2 + 16), 3: (32, 2 + 2 + 16), 8: (32, 2 + 32)}


def _f16(col):
    """(n_blocks, 2) uint8 -> (n_blocks, 1) float32: a block's fp16 scale."""
    return col.view("<f2").astype(np.float32)


def _nibbles(qs):
    """(n_blocks, 16) packed uint8 -> (n_blocks, 32): low nibbles are values 0-15, high ones 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def dequantize(raw, ggml_type):
    """Raw bytes of one tensor (uint8, 1-D) -> float32 values (1-D), vectorized over blocks.

    Q8_0 block (34 B):  d fp16 | q int8[32]                    x = d·q
    Q4_0 block (18 B):  d fp16 | 16 B of 4-bit q               x = d·(q − 8)
    Q4_1 block (20 B):  d fp16 | m fp16 | 16 B of 4-bit q      x = d·q + m
    The products are taken in float32, in the order ggml's reference code uses, so the result is
    bit-identical to ggml's (and the `gguf` package's) dequantization.
    """
    if ggml_type == 0:
        return raw.view("<f4").astype(np.float32)
    if ggml_type == 1:
        return raw.view("<f2").astype(np.float32)
    if ggml_type == 30:  # bfloat16 is the top half of a float32
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    size, nbytes = _BLOCK[ggml_type]
    blocks = raw.reshape(-1, nbytes)  # (n_blocks, bytes per block)
    if ggml_type == 8:
        out = blocks[:, 2:].view(np.int8).astype(np.float32) * _f16(blocks[:, :2])
    elif ggml_type == 2:
        out = _f16(blocks[:, :2]) * (_nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)).astype(np.float32)
    else:  # Q4_1
        out = _f16(blocks[:, :2]) * _nibbles(blocks[:, 4:]).astype(np.float32) + _f16(blocks[:, 2:4])
    return out.reshape(-1)  # (n_blocks * 32,)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple  # numpy order: GGUF's ne reversed
    ggml_type: int
    offset: int  # absolute position of the first byte in the file
    nbytes: int | None  # None for types this reader does not size

    @property
    def type_name(self):
        return GGML_TYPE_NAMES.get(self.ggml_type, f"unknown type {self.ggml_type}")


class _Cursor:
    """Reads little-endian fields from the mapped file, raising on anything past its end."""

    def __init__(self, buf, path):
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, n, what):
        if self.pos + n > len(self.buf):
            raise ValueError(f"{self.path}: truncated GGUF file: {what} at byte {self.pos} needs {n} bytes, "
                             f"the file has {len(self.buf)}")
        view = self.buf[self.pos:self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt, what):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what):
        raw = bytes(self.take(self.scalar("<Q", what), what))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: {what} is not valid UTF-8 ({e})") from None

    def value(self, vtype, what, depth=0):
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            if depth == MAX_ARRAY_DEPTH:
                raise ValueError(f"{self.path}: {what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
            etype, count = self.scalar("<I", what), self.scalar("<Q", what)
            if count > MAX_ARRAY_LEN:       # as Python lists, a 48 MB array would take about 800 MB
                raise ValueError(f"{self.path}: {what} holds {count:,} elements, more than the "
                                 f"{MAX_ARRAY_LEN:,} this reader accepts")
            if etype in _SCALAR:  # one vectorized read for numeric arrays (token types, scores)
                dt = np.dtype(_SCALAR[etype])
                return np.frombuffer(self.take(count * dt.itemsize, what), dtype=dt).tolist()
            if count > len(self.buf) - self.pos:              # every element takes at least a byte
                raise ValueError(f"{self.path}: truncated GGUF file: {what} claims {count} elements")
            return [self.value(etype, what, depth + 1) for _ in range(count)]
        if vtype not in _SCALAR:
            raise ValueError(f"{self.path}: {what} has unknown metadata value type {vtype}")
        return self.scalar(_SCALAR[vtype], what)


class _LazyTensors(Mapping):
    """name -> float32 array, dequantized from the memory map on every access (nothing cached)."""

    def __init__(self, gf):
        self._gf = gf

    def __getitem__(self, name):
        return self._gf.tensor(name)

    def __iter__(self):
        return iter(self._gf.tensor_info)

    def __len__(self):
        return len(self._gf.tensor_info)


class GGUFFile:
    """A memory-mapped GGUF file: `.metadata` (key -> value, arrays as lists), `.tensor_info`
    (name -> TensorInfo) and `.tensors` (name -> dequantized float32 array, read on access)."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"{self.path}: GGUF file not found")
        size = self.path.stat().st_size
        if size < 24:
            raise ValueError(f"{self.path}: not a GGUF file ({size} bytes, the header alone is 24)")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        cur = _Cursor(memoryview(self._map), self.path)
        magic = bytes(cur.take(4, "magic"))
        if magic != MAGIC:
            raise ValueError(f"{self.path}: not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
        self.version = cur.scalar("<I", "version")
        if self.version not in (2, 3):
            hint = " (a big-endian file?)" if self.version > 0xFFFF else ""
            raise ValueError(f"{self.path}: GGUF version {self.version} is not supported{hint}; "
                             f"this reader handles versions 2 and 3")
        n_tensors, n_kv = cur.scalar("<Q", "tensor count"), cur.scalar("<Q", "metadata count")

        self.metadata = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key {i}")
            if key in self.metadata:        # llama.cpp refuses a repeated key, so does this reader
                raise ValueError(f"{self.path}: metadata key {key!r} appears twice")
            self.metadata[key] = cur.value(cur.scalar("<I", f"type of {key!r}"), f"metadata {key!r}")

        infos, names = [], set()
        for i in range(n_tensors):
            name = cur.string(f"tensor name {i}")
            if name in names:
                raise ValueError(f"{self.path}: tensor name {name!r} appears twice")
            names.add(name)
            n_dims = cur.scalar("<I", f"tensor {name!r}")
            if not 1 <= n_dims <= 4:
                raise ValueError(f"{self.path}: tensor {name!r} has {n_dims} dimensions (ggml allows 1 to 4)")
            ne = [cur.scalar("<Q", f"tensor {name!r}") for _ in range(n_dims)]
            infos.append((name, ne, cur.scalar("<I", f"tensor {name!r}"), cur.scalar("<Q", f"tensor {name!r}")))

        self.alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(self.alignment, bool) or not isinstance(self.alignment, numbers.Integral) \
                or self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise ValueError(f"{self.path}: general.alignment = {self.alignment!r} is not a power of two")
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment  # header padded to alignment

        self.tensor_info = {}
        for name, ne, ggml_type, offset in infos:
            n = math.prod(ne)                 # Python ints: numpy's product would wrap past 2**64
            nbytes = None
            if ggml_type in _BLOCK:
                block, block_bytes = _BLOCK[ggml_type]
                if ne[0] % block:
                    raise ValueError(f"{self.path}: tensor {name!r}: {GGML_TYPE_NAMES[ggml_type]} rows of "
                                     f"{ne[0]} values are not a whole number of {block}-value blocks")
                nbytes = n // block * block_bytes
                end = self.data_offset + offset + nbytes
                if end > size:
                    raise ValueError(f"{self.path}: truncated GGUF file: tensor {name!r} ends at byte {end}, "
                                     f"the file has {size}")
            self.tensor_info[name] = TensorInfo(name, tuple(reversed(ne)), ggml_type,
                                                self.data_offset + offset, nbytes)
        self.tensors = _LazyTensors(self)

    def tensor(self, name):
        """Dequantized float32 array in numpy shape (GGUF's ne reversed); a fresh copy each call."""
        info = self.tensor_info[name]
        if info.nbytes is None:
            raise ValueError(f"{self.path}: tensor {name!r} has type {info.type_name}; this reader "
                             f"dequantizes only {', '.join(GGML_TYPE_NAMES[t] for t in _BLOCK)}")
        raw = self._map[info.offset:info.offset + info.nbytes]  # (nbytes,) uint8, still on disk
        return dequantize(np.asarray(raw), info.ggml_type).reshape(info.shape)

    def __repr__(self):
        return f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.metadata)} keys, {len(self.tensor_info)} tensors)"


def read_gguf(path):
    return GGUFFile(path)


# ---------------------------------------------------------------------------------------------
# llama.cpp's LLaMA names -> Meta's params.json and checkpoint keys

_GLOBAL_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                 "output.weight": "output.weight"}
_LAYER_NAMES = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
                "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
                "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}


def meta_key(gguf_name):
    """`blk.3.ffn_gate.weight` -> `layers.3.feed_forward.w1.weight`; None for a name LLaMA lacks."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(0|[1-9]\d*)\.(\w+)\.weight", gguf_name)   # blk.03 is no block
    if m and m[2] in _LAYER_NAMES:
        return f"layers.{int(m[1])}.{_LAYER_NAMES[m[2]]}.weight"
    return None


def _f32_value(v):
    """A float32 metadata value as its shortest decimal: 9.999999747e-06 -> 1e-05."""
    return float(np.format_float_positional(np.float32(v), unique=True, trim="-"))


def _ffn_size(dim, multiple_of, ffn_dim_multiplier=None):
    """Meta's SwiGLU hidden size: 2/3 of 4·dim, times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def gguf_params(gf):
    """The `llama.*` metadata as Meta params.json keys (plus rope_theta, max_seq_len, tie_embeddings)."""
    md, path = gf.metadata, gf.path
    arch = md.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}; only 'llama' models load here")

    def get(key, default=None):
        full = f"llama.{key}"
        if full not in md and default is None:
            raise ValueError(f"{path}: metadata {full!r} is missing")
        return md.get(full, default)

    def count(key, default=None):
        v = get(key, default)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{path}: metadata 'llama.{key}' should be a positive integer, got {v!r:.80}")
        return int(v)

    def real(key, default=None):
        v = get(key, default)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{path}: metadata 'llama.{key}' should be a number, got {v!r:.80}")
        return v

    dim, n_heads = count("embedding_length"), count("attention.head_count")
    n_kv_heads = count("attention.head_count_kv", n_heads)
    n_layers = count("block_count")
    if n_layers > len(gf.tensor_info):       # each block holds 9 tensors: a larger count is corrupt
        raise ValueError(f"{path}: block_count {n_layers} but the file holds only {len(gf.tensor_info)} tensors")
    head_dim = dim // n_heads
    if dim % n_heads or get("rope.dimension_count", head_dim) != head_dim \
            or get("attention.key_length", head_dim) != head_dim:
        raise ValueError(f"{path}: head size is not embedding_length / head_count = {dim}/{n_heads}, "
                         f"or rotary embeddings cover only part of it; Meta's LLaMA cannot hold this model")
    scaling = md.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"{path}: rope scaling {scaling!r} is not supported")
    if "token_embd.weight" not in gf.tensor_info:
        raise ValueError(f"{path}: no token_embd.weight tensor")
    vocab = (count("vocab_size") if "llama.vocab_size" in md else
             len(md.get("tokenizer.ggml.tokens", ())) or gf.tensor_info["token_embd.weight"].shape[0])
    params = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                  vocab_size=int(vocab), multiple_of=256, ffn_dim_multiplier=None,
                  norm_eps=_f32_value(real("attention.layer_norm_rms_epsilon")),
                  rope_theta=_f32_value(real("rope.freq_base", 10000.0)),
                  max_seq_len=count("context_length"),
                  tie_embeddings="output.weight" not in gf.tensor_info)
    hidden = count("feed_forward_length")
    if _ffn_size(dim, params["multiple_of"]) != hidden:  # not derivable: say it outright
        params["hidden_dim"] = hidden
    return params


def _expected_shapes(p):
    """Meta key -> shape, from the params alone: checks the file against its own metadata."""
    hd = p["dim"] // p["n_heads"]
    hidden = p.get("hidden_dim") or _ffn_size(p["dim"], p["multiple_of"], p["ffn_dim_multiplier"])
    shapes = {"tok_embeddings.weight": (p["vocab_size"], p["dim"]), "norm.weight": (p["dim"],)}
    if not p["tie_embeddings"]:
        shapes["output.weight"] = (p["vocab_size"], p["dim"])
    for i in range(p["n_layers"]):
        shapes.update({
            f"layers.{i}.attention.wq.weight": (p["n_heads"] * hd, p["dim"]),
            f"layers.{i}.attention.wk.weight": (p["n_kv_heads"] * hd, p["dim"]),
            f"layers.{i}.attention.wv.weight": (p["n_kv_heads"] * hd, p["dim"]),
            f"layers.{i}.attention.wo.weight": (p["dim"], p["n_heads"] * hd),
            f"layers.{i}.feed_forward.w1.weight": (hidden, p["dim"]),
            f"layers.{i}.feed_forward.w2.weight": (p["dim"], hidden),
            f"layers.{i}.feed_forward.w3.weight": (hidden, p["dim"]),
            f"layers.{i}.attention_norm.weight": (p["dim"],),
            f"layers.{i}.ffn_norm.weight": (p["dim"],),
        })
    return shapes


def load_gguf(path):
    """A llama-architecture GGUF -> (Meta params, Meta state_dict of float32 tensors, tokenizer).

    No permutation of attn_q / attn_k: llama.cpp's converter permutes Hugging Face's half-rotation
    layout back to Meta's interleaved one when it writes the file, so the rows are already Meta's.
    The tokenizer is a BPETokenizer for `tokenizer.ggml.model == "gpt2"` (SmolLM2); for other
    vocabularies (LLaMA 2's SentencePiece one) it is None, with a warning: pass that model's
    tokenizer.model to SentencePieceTokenizer instead.
    """
    gf = read_gguf(path)
    params = gguf_params(gf)
    expected = _expected_shapes(params)
    state_dict = {}
    for name, info in gf.tensor_info.items():
        key = meta_key(name)
        if key is None or key not in expected:
            raise ValueError(f"{gf.path}: tensor {name!r} has no place in a LLaMA model with "
                             f"{params['n_layers']} layers (tied embeddings: {params['tie_embeddings']})")
        if info.shape != expected[key]:
            raise ValueError(f"{gf.path}: tensor {name!r} has shape {info.shape}, the metadata implies "
                             f"{expected[key]} for {key}")
        state_dict[key] = torch.from_numpy(gf.tensor(name))
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise ValueError(f"{gf.path}: {len(missing)} tensors missing, e.g. {missing[:3]}")

    kind = gf.metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        warnings.warn(f"{gf.path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') "
                      f"vocabularies are built from GGUF metadata, so the tokenizer is None")
        return params, state_dict, None
    return params, state_dict, BPETokenizer.from_gguf(gf.metadata, source=str(gf.path))
