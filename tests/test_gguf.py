"""soka/gguf.py against the `gguf` package (llama.cpp's own Python reader and writer) as the oracle.

    python -m pytest -q tests/test_gguf.py

Real file: the SmolLM2 demo model (conftest.py's `demo_gguf`, fetched on first use). Small files:
written with gguf.GGUFWriter.
"""
import struct

import gguf
import numpy as np
import pytest
import torch

from soka.gguf import GGML_TYPE_NAMES, MAX_ARRAY_LEN, load_gguf, read_gguf

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def demo(demo_gguf):
    return read_gguf(demo_gguf), gguf.GGUFReader(demo_gguf)


# ---------------------------------------------------------------------------------------------
# the real file

def test_header_and_metadata_equal_gguf_reader(demo):
    ours, ref = demo
    assert ours.version == ref.fields["GGUF.version"].contents()
    assert len(ours.tensor_info) == ref.fields["GGUF.tensor_count"].contents()
    ref_kv = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert len(ref_kv) == ref.fields["GGUF.kv_count"].contents()
    assert list(ours.metadata) == list(ref_kv)  # same keys, same order
    for key, value in ref_kv.items():
        assert ours.metadata[key] == value, key
        assert type(ours.metadata[key]) is type(value), key
    assert ours.data_offset == ref.data_offset
    assert [t.name for t in ref.tensors] == list(ours.tensor_info)
    for t in ref.tensors:
        info = ours.tensor_info[t.name]
        assert info.shape == tuple(int(n) for n in reversed(t.shape)), t.name  # ne reversed
        assert info.ggml_type == int(t.tensor_type) and info.offset == t.data_offset, t.name
        assert info.nbytes == t.n_bytes, t.name


def test_every_tensor_dequantizes_as_gguf_does(demo):
    ours, ref = demo
    seen = set()
    for t in ref.tensors:
        expect = gguf.quants.dequantize(t.data, t.tensor_type)  # (rows, cols) float32
        got = ours.tensors[t.name]
        assert got.dtype == np.float32 and got.shape == expect.shape, t.name
        assert np.array_equal(got, expect), t.name  # bit-exact: same float32 ops in the same order
        seen.add(t.tensor_type.name)
    assert {"F32", "Q8_0", "Q4_1"} <= seen


def test_load_gguf_params_and_keys(demo, demo_gguf):
    gf, _ = demo
    md = gf.metadata
    params, sd, tok = load_gguf(demo_gguf)
    assert params["dim"] == md["llama.embedding_length"]
    assert params["n_layers"] == md["llama.block_count"]
    assert params["n_heads"] == md["llama.attention.head_count"]
    assert params["n_kv_heads"] == md["llama.attention.head_count_kv"]
    assert params["vocab_size"] == md["llama.vocab_size"] == len(md["tokenizer.ggml.tokens"])
    assert params["max_seq_len"] == md["llama.context_length"]
    assert np.float32(params["norm_eps"]) == np.float32(md["llama.attention.layer_norm_rms_epsilon"])
    assert params["rope_theta"] == 100000.0  # docs/method.md, "Checkpoint layouts"
    assert params["tie_embeddings"] is True and "output.weight" not in sd  # tied embeddings
    # Meta's FFN rule (2/3 · 4·dim rounded up to multiple_of) gives the file's size, so no hidden_dim.
    hidden = 2 * 4 * params["dim"] // 3
    assert "hidden_dim" not in params
    assert -(-hidden // params["multiple_of"]) * params["multiple_of"] == md["llama.feed_forward_length"]

    n = params["n_layers"]
    per_layer = ["attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                 "feed_forward.w2", "feed_forward.w3", "attention_norm", "ffn_norm"]
    expected = {"tok_embeddings.weight", "norm.weight"} | {f"layers.{i}.{k}.weight" for i in range(n) for k in per_layer}
    assert set(sd) == expected
    assert all(v.dtype == torch.float32 for v in sd.values())
    for meta, name in [("tok_embeddings.weight", "token_embd.weight"), ("norm.weight", "output_norm.weight"),
                       ("layers.7.feed_forward.w1.weight", "blk.7.ffn_gate.weight"),
                       ("layers.7.feed_forward.w2.weight", "blk.7.ffn_down.weight"),
                       ("layers.7.feed_forward.w3.weight", "blk.7.ffn_up.weight"),
                       ("layers.7.attention.wo.weight", "blk.7.attn_output.weight"),
                       ("layers.7.attention_norm.weight", "blk.7.attn_norm.weight")]:
        assert torch.equal(sd[meta], torch.from_numpy(gf.tensors[name])), meta
    assert tok.vocab_size == params["vocab_size"] and tok.eos_id == md["tokenizer.ggml.eos_token_id"]


def _rope_interleaved(x, theta):
    """Meta's rotary embedding: pairs (2i, 2i+1) of each head rotate together. x (T, H, hd)."""
    T, _, hd = x.shape
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    xc = torch.view_as_complex(x.double().reshape(T, -1, hd // 2, 2))
    return torch.view_as_real(xc * torch.polar(torch.ones_like(freqs), freqs)[:, None, :]).reshape(x.shape)


def test_attn_q_k_are_in_meta_layout(demo):
    """Attention scores of layer 0 on real embeddings: our unpermuted wq/wk with Meta's interleaved
    rotary equal transformers' (its own GGUF q/k permutation and its half-rotation rotary)."""
    from transformers.models.llama import modeling_llama as llama
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    gf, ref = demo
    md = gf.metadata
    H, KV = md["llama.attention.head_count"], md["llama.attention.head_count_kv"]
    hd, theta = md["llama.embedding_length"] // H, md["llama.rope.freq_base"]
    raw = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in ref.tensors
           if t.name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight")}
    proc = LlamaTensorProcessor(config={"num_attention_heads": H, "num_key_value_heads": KV})
    hf_q, hf_k = (torch.from_numpy(proc.process(raw[f"blk.0.attn_{w}.weight"], f"blk.0.attn_{w}.weight").weights.copy())
                  for w in "qk")
    wq, wk = torch.from_numpy(gf.tensors["blk.0.attn_q.weight"]), torch.from_numpy(gf.tensors["blk.0.attn_k.weight"])
    assert not torch.equal(wq, hf_q)  # transformers really does reorder the rows

    ids = torch.tensor([504, 3458, 7016, 2113, 28, 16, 17, 18, 30, 1003, 288, 4418])
    x = torch.from_numpy(gf.tensors["token_embd.weight"])[ids].double()  # (T, dim)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * torch.from_numpy(gf.tensors["blk.0.attn_norm.weight"]).double()
    T = len(ids)

    def scores(q, k):  # (T, H, hd), (T, KV, hd) -> (H, T, T)
        k = k.repeat_interleave(H // KV, dim=1)
        return torch.einsum("thd,shd->hts", q, k) / hd ** 0.5

    q, k = (x @ wq.double().T).view(T, H, hd), (x @ wk.double().T).view(T, KV, hd)
    ours = scores(_rope_interleaved(q, theta), _rope_interleaved(k, theta))

    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.outer(torch.arange(T, dtype=torch.float64), inv)
    cos, sin = torch.cat([ang, ang], -1).cos()[None], torch.cat([ang, ang], -1).sin()[None]  # (1, T, hd)

    def hf_scores(wq_, wk_):
        q = (x @ wq_.double().T).view(1, T, H, hd).transpose(1, 2)  # (1, H, T, hd)
        k = (x @ wk_.double().T).view(1, T, KV, hd).transpose(1, 2)
        q, k = llama.apply_rotary_pos_emb(q, k, cos, sin)
        return scores(q[0].transpose(0, 1), k[0].transpose(0, 1))

    ref_scores = hf_scores(hf_q, hf_k)
    torch.testing.assert_close(ours, ref_scores, rtol=1e-9, atol=1e-9)
    # and the check has teeth: the half-rotation rotary on the unpermuted rows disagrees
    assert (hf_scores(wq, wk) - ref_scores).abs().max() > 1e-2 * ref_scores.abs().max()


# ---------------------------------------------------------------------------------------------
# small files written by gguf.GGUFWriter

def _write(path, kv=(), tensors=(), alignment=None, arch="llama"):
    """kv: (adder name, key, value); tensors: (name, array, ggml type to quantize to, or None)."""
    w = gguf.GGUFWriter(str(path), arch)
    if alignment:
        w.add_custom_alignment(alignment)
    for adder, key, value in kv:
        getattr(w, f"add_{adder}")(key, value)
    for name, array, qtype in tensors:
        if qtype is None:
            w.add_tensor(name, array)
        else:  # uint8 arrays are already blocks
            blocks = array if array.dtype == np.uint8 else gguf.quants.quantize(array, qtype)
            w.add_tensor(name, blocks, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


ALL_TYPES_KV = [("uint8", "t.u8", 250), ("int8", "t.i8", -7), ("uint16", "t.u16", 65000), ("int16", "t.i16", -300),
                ("uint32", "t.u32", 4_000_000_000), ("int32", "t.i32", -2_000_000_000), ("float32", "t.f32", 0.1),
                ("uint64", "t.u64", 2**63 + 5), ("int64", "t.i64", -(2**62)), ("float64", "t.f64", 1 / 3),
                ("bool", "t.bool", True), ("string", "t.str", "héllo ✓"), ("array", "t.ints", [1, -2, 3]),
                ("array", "t.floats", [0.5, -1.25]), ("array", "t.strs", ["a", "", "ü"]),
                ("array", "t.nested", [[1, 2], [3]]), ("array", "t.empty", [])]


@pytest.mark.parametrize("alignment", [None, 64])
def test_small_file_every_value_type_and_block_type(tmp_path, alignment):
    rng = np.random.default_rng(0)
    w = {name: rng.standard_normal((3, 64)).astype(np.float32) for name in ("f32", "f16", "bf16", "q40", "q41", "q80")}
    tensors = [("f32", w["f32"], None), ("f16", w["f16"].astype(np.float16), None), ("bf16", w["bf16"], Q.BF16),
               ("q40", w["q40"], Q.Q4_0), ("q41", w["q41"], Q.Q4_1), ("q80", w["q80"], Q.Q8_0),
               ("vec", rng.standard_normal(5).astype(np.float32), None),
               ("cube", rng.standard_normal((2, 3, 4)).astype(np.float32), None)]
    path = _write(tmp_path / "t.gguf", ALL_TYPES_KV, tensors, alignment)
    ours, ref = read_gguf(path), gguf.GGUFReader(path)
    for key, f in ref.fields.items():
        if not key.startswith("GGUF.") and key != "t.nested":
            assert ours.metadata[key] == f.contents(), key
    assert ours.metadata["t.nested"] == [[1, 2], [3]]  # gguf's contents() flattens arrays of arrays
    assert ours.metadata["t.f32"] == float(np.float32(0.1)) and ours.metadata["t.u64"] == 2**63 + 5
    assert ours.alignment == (alignment or 32) and ours.data_offset % ours.alignment == 0
    for t in ref.tensors:
        expect = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.array_equal(ours.tensors[t.name], expect), t.name
    # quantization error sanity: our Q8_0 / F16 values are close to what was written
    assert np.abs(ours.tensors["q80"] - w["q80"]).max() < 0.05
    assert ours.tensors["cube"].shape == (2, 3, 4)


def test_unsupported_block_type_names_tensor_type_and_file(tmp_path):
    x = np.random.default_rng(1).standard_normal((2, 256)).astype(np.float32)
    q4k = np.random.default_rng(2).integers(0, 256, (2, 144), dtype=np.uint8)  # 144 B: one Q4_K block of 256 values
    path = _write(tmp_path / "k.gguf", tensors=[("ok", x, None), ("blk.0.attn_q.weight", q4k, Q.Q4_K)])
    gf = read_gguf(path)  # metadata and supported tensors stay readable
    assert np.array_equal(gf.tensors["ok"], x)
    with pytest.raises(ValueError) as e:
        gf.tensors["blk.0.attn_q.weight"]
    assert "blk.0.attn_q.weight" in str(e.value) and "Q4_K" in str(e.value) and str(path) in str(e.value)


def test_truncated_and_foreign_files(tmp_path):
    x = np.ones((4, 32), np.float32)
    path = _write(tmp_path / "g.gguf", [("string", "t.s", "x" * 100)], [("w", x, Q.Q8_0)])
    good, info = path.read_bytes(), read_gguf(path).tensor_info["w"]
    assert info.nbytes == 4 * 34  # four Q8_0 blocks
    # the file may end in alignment padding; cut one byte of the tensor itself
    for cut, where in [(info.offset + info.nbytes - 1, "tensor 'w'"), (40, "truncated"), (10, "")]:
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(good[:cut])
        with pytest.raises(ValueError, match="truncated|not a GGUF") as e:
            read_gguf(p)
        assert str(p) in str(e.value) and where in str(e.value)

    p = tmp_path / "magic.gguf"
    p.write_bytes(b"GGML" + good[4:])
    with pytest.raises(ValueError, match="magic"):
        read_gguf(p)
    p = tmp_path / "v1.gguf"
    p.write_bytes(good[:4] + (1).to_bytes(4, "little") + good[8:])
    with pytest.raises(ValueError, match="version 1"):
        read_gguf(p)
    with pytest.raises(ValueError, match="not found"):
        read_gguf(tmp_path / "missing.gguf")


def _tiny_llama(path, *, ffn=100, extra=(), drop=(), bad_shape=None, metadata=()):
    """A 2-layer LLaMA GGUF (dim 32, 4 heads, 2 kv heads), untied, with a SentencePiece-type vocab."""
    rng = np.random.default_rng(2)
    dim, hd, kv, vocab = 32, 8, 2, 64
    shapes = {"token_embd.weight": (vocab, dim), "output.weight": (vocab, dim), "output_norm.weight": (dim,)}
    for i in range(2):
        shapes |= {f"blk.{i}.attn_q.weight": (dim, dim), f"blk.{i}.attn_k.weight": (kv * hd, dim),
                   f"blk.{i}.attn_v.weight": (kv * hd, dim), f"blk.{i}.attn_output.weight": (dim, dim),
                   f"blk.{i}.ffn_gate.weight": (ffn, dim), f"blk.{i}.ffn_up.weight": (ffn, dim),
                   f"blk.{i}.ffn_down.weight": (dim, ffn), f"blk.{i}.attn_norm.weight": (dim,),
                   f"blk.{i}.ffn_norm.weight": (dim,)}
    shapes |= dict(extra)
    if bad_shape:
        shapes[bad_shape] = (shapes[bad_shape][0] + 1, *shapes[bad_shape][1:])
    tensors = [(n, rng.standard_normal(s).astype(np.float32), None) for n, s in shapes.items() if n not in drop]
    kv_ = [("uint32", "llama.block_count", 2), ("uint32", "llama.context_length", 128),
           ("uint32", "llama.embedding_length", dim), ("uint32", "llama.feed_forward_length", ffn),
           ("uint32", "llama.attention.head_count", 4), ("uint32", "llama.attention.head_count_kv", kv),
           ("float32", "llama.rope.freq_base", 10000.0), ("float32", "llama.attention.layer_norm_rms_epsilon", 1e-6),
           ("uint32", "llama.vocab_size", vocab), ("string", "tokenizer.ggml.model", "llama")]
    override = {key: (adder, value) for adder, key, value in metadata}    # (adder, key, value) replacing one
    kv_ = [(override[k][0], k, override[k][1]) if k in override else (a, k, v) for a, k, v in kv_]
    kv_ += [(a, k, v) for k, (a, v) in override.items() if k not in {key for _, key, _ in kv_}]   # or added
    return _write(path, kv_, tensors), tensors


def test_load_gguf_tiny_untied_model(tmp_path):
    path, tensors = _tiny_llama(tmp_path / "tiny.gguf")
    with pytest.warns(UserWarning, match="tokenizer"):
        params, sd, tok = load_gguf(path)
    assert tok is None
    assert params["tie_embeddings"] is False and params["hidden_dim"] == 100  # 100 is no multiple of 256
    assert params["norm_eps"] == 1e-6 and params["n_kv_heads"] == 2
    raw = {n: a for n, a, _ in tensors}
    assert torch.equal(sd["output.weight"], torch.from_numpy(raw["output.weight"]))
    assert torch.equal(sd["layers.1.attention.wk.weight"], torch.from_numpy(raw["blk.1.attn_k.weight"]))
    assert torch.equal(sd["layers.0.feed_forward.w2.weight"], torch.from_numpy(raw["blk.0.ffn_down.weight"]))


@pytest.mark.parametrize("kind", ["stray", "missing", "shape", "layer", "alias"])
def test_load_gguf_refuses_partial_or_inconsistent_files(tmp_path, kind):
    args = {"stray": dict(extra={"rope_freqs.weight": (4,)}),
            "missing": dict(drop={"blk.1.ffn_up.weight"}),
            "shape": dict(bad_shape="blk.0.attn_v.weight"),
            "layer": dict(extra={"blk.2.attn_norm.weight": (32,)}),
            "alias": dict(extra={"blk.00.attn_q.weight": (32, 32)})}[kind]   # int("00") would make it blk.0's
    path, _ = _tiny_llama(tmp_path / f"{kind}.gguf", **args)
    word = {"stray": "rope_freqs", "missing": "missing", "shape": "shape", "layer": "blk.2", "alias": "blk.00"}[kind]
    with pytest.raises(ValueError, match=word) as e:
        load_gguf(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("adder, key, value, message", [
    ("uint32", "llama.attention.head_count", 0, "head_count' should be a positive integer, got 0"),
    ("array", "llama.embedding_length", [32, 32], "embedding_length' should be a positive integer, got \\[32, 32\\]"),
    ("uint64", "llama.block_count", 10**12, "block_count 1000000000000 but the file holds only 21 tensors"),
    ("string", "llama.attention.layer_norm_rms_epsilon", "1e-6", "layer_norm_rms_epsilon' should be a number"),
    ("string", "general.alignment", "32", "general.alignment = '32' is not a power of two"),
])
def test_bad_metadata_is_one_error_naming_the_file(tmp_path, adder, key, value, message):
    # unchecked, each would end in ZeroDivisionError, TypeError or MemoryError
    path, _ = _tiny_llama(tmp_path / "bad.gguf", metadata=[(adder, key, value)])
    with pytest.raises(ValueError, match=message) as e:
        load_gguf(path)
    assert str(e.value).startswith(str(path))


def test_deeply_nested_metadata_arrays_are_refused(tmp_path):
    # magic, version 3, no tensors, one key whose array holds an array ... 20,000 deep (a RecursionError before)
    depth = 20_000
    body = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 5) + b"t.key" + struct.pack("<I", 9)
    body += struct.pack("<IQ", 9, 1) * depth + struct.pack("<IQ", 4, 0)
    path = tmp_path / "deep.gguf"
    path.write_bytes(body)
    with pytest.raises(ValueError, match=r"deep.gguf: metadata 't.key' nests arrays more than 4 deep"):
        read_gguf(path)


def _raw_gguf(kv=(), tensors=()):
    """GGUF v3 bytes written field by field: kv (key, type, value bytes), tensors (name, float32 array)."""
    def s(x):
        return struct.pack("<Q", len(x.encode())) + x.encode()
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    head += b"".join(s(k) + struct.pack("<I", t) + v for k, t, v in kv)
    for i, (name, a) in enumerate(tensors):      # F32 (type 0), one dimension, 32-byte slots
        head += s(name) + struct.pack("<IQIQ", 1, a.size, 0, 32 * i)
    return head + b"\0" * (-len(head) % 32) + b"".join(a.tobytes().ljust(32, b"\0") for _, a in tensors)


@pytest.mark.parametrize("kind", ["key", "tensor"])
def test_a_repeated_metadata_key_or_tensor_name_is_refused(tmp_path, kind):
    # llama.cpp refuses both; reading on would keep the last copy, a silently different model
    one = struct.pack("<I", 1)
    kv = [("llama.block_count", 4, one)] * (2 if kind == "key" else 1)
    tensors = [("w", np.ones(8, np.float32))] * (2 if kind == "tensor" else 1)
    path = tmp_path / "dup.gguf"
    path.write_bytes(_raw_gguf(kv, tensors))
    word = {"key": "metadata key 'llama.block_count' appears twice", "tensor": "tensor name 'w' appears twice"}[kind]
    with pytest.raises(ValueError, match=word) as e:
        read_gguf(path)
    assert str(e.value).startswith(str(path))


def test_a_metadata_array_past_the_length_limit_is_refused(tmp_path):
    # as Python lists a 48 MB array of bytes took 800 MB; the limit is far above any vocabulary
    n = MAX_ARRAY_LEN + 1
    path = tmp_path / "long.gguf"
    path.write_bytes(_raw_gguf([("t.arr", 9, struct.pack("<IQ", 0, n) + bytes(n))]))
    with pytest.raises(ValueError, match=f"metadata 't.arr' holds {n:,} elements, more than the"):
        read_gguf(path)
    path.write_bytes(_raw_gguf([("t.arr", 9, struct.pack("<IQ", 0, 3) + bytes([1, 2, 3]))]))
    assert read_gguf(path).metadata["t.arr"] == [1, 2, 3]


def test_type_names_cover_gguf_package():
    for t in Q:
        if t.value in GGML_TYPE_NAMES:
            assert GGML_TYPE_NAMES[t.value] == t.name
