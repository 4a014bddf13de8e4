"""model.py: the architecture against transformers' LlamaForCausalLM, the three checkpoint formats,
and clear errors on bad checkpoints.

    python -m pytest -q tests/test_model.py
"""
import json
import os
import re
import shutil
import struct

import pytest
import torch
import torch.nn as nn
import transformers

import model as M
from model import ModelArgs, Transformer, generate, load_checkpoint, read_config
from soka.checkpoints import hf_tokenizer, read_safetensors


def tiny_hf(*, tied=False, seed=0):
    """A random LlamaForCausalLM with grouped-query attention (4 query heads, 2 key/value heads)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=500.0, max_position_embeddings=128,
        tie_word_embeddings=tied, initializer_range=0.1)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    hf = tiny_hf()
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)
    return hf, folder


def write_meta(model, folder, *, n_shards, vocab_size=None):
    """Our model in Meta's layout: params.json and consolidated.NN.pth, split the way Meta splits."""
    a = model.args
    params = dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                  vocab_size=a.vocab_size if vocab_size is None else vocab_size, multiple_of=a.multiple_of,
                  norm_eps=a.norm_eps, rope_theta=a.rope_theta, hidden_dim=a.hidden_dim)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    shards = [{"rope.freqs": torch.randn(a.head_dim // 2)} for _ in range(n_shards)]
    for k, t in model.state_dict().items():
        name = k.split(".")[-2]
        dim = M.SHARD_DIM.get(name)
        parts = t.chunk(n_shards, dim=dim) if dim is not None else [t] * n_shards
        for shard, part in zip(shards, parts):
            shard[k] = part.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    return folder


def test_ffn_dim_follows_meta():
    assert ModelArgs().ffn_dim == 11008                                      # LLaMA-2-7B
    assert ModelArgs(dim=5120, n_heads=40).ffn_dim == 13824                  # 13B
    assert ModelArgs(dim=8192, n_heads=64, n_kv_heads=8, multiple_of=4096,
                     ffn_dim_multiplier=1.3).ffn_dim == 28672                # 70B
    assert ModelArgs(dim=576, n_heads=9, hidden_dim=1536).ffn_dim == 1536    # SmolLM2: explicit
    assert ModelArgs().n_kv_heads == 32


def test_linear_shapes_are_the_modules_shapes():
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=160)
    block = Transformer(args).layers[0]
    modules = {**{n: getattr(block.attention, n) for n in ("wq", "wk", "wv", "wo")},
               **{n: getattr(block.feed_forward, n) for n in ("w1", "w2", "w3")}}
    assert args.linear_shapes() == {n: tuple(mod.weight.shape) for n, mod in modules.items()}


def test_bad_args():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=-1))
    for bad, msg in ((dict(dim="64"), "dim must be a positive integer, got '64'"),
                     (dict(n_heads=0), "n_heads must be a positive integer, got 0"),
                     (dict(rope_theta="1e4"), "rope_theta must be a positive number, got '1e4'"),
                     (dict(ffn_dim_multiplier=[1.3]), r"ffn_dim_multiplier must be a positive number, got \[1\.3\]"),
                     (dict(tie_embeddings="false"), "tie_embeddings must be true or false")):
        with pytest.raises(ValueError, match=msg):
            ModelArgs(**bad)
    # what Meta's params.json files hold: -1, null, ints where floats go, floats where they may
    a = ModelArgs(vocab_size=-1, ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=500000)
    assert a.vocab_size == -1 and ModelArgs(ffn_dim_multiplier=1.3, n_kv_heads=8).ffn_dim == 14336


def test_module_names_are_meta_keys_and_layers_swap_by_name():
    with torch.device("meta"):
        m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96))
    keys = set(m.state_dict())
    for i in range(2):
        for k in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                  "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "attention_norm", "ffn_norm"):
            assert f"layers.{i}.{k}.weight" in keys
    assert keys - {k for k in keys if k.startswith("layers.")} == {"tok_embeddings.weight", "norm.weight", "output.weight"}
    assert len(keys) == 2 * 9 + 3
    assert list(m.buffers()) == []     # no KV cache (nor any other buffer) allocated in __init__
    assert isinstance(m.get_submodule("layers.1.attention.wq"), nn.Linear)

    # An adapter replaces a layer by name with any module computing y = layer(x).
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96))
    x = torch.randint(0, 96, (2, 9))
    ref = m(x)

    class Wrap(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) + 0.0

    m.layers[1].attention.wq = Wrap(m.layers[1].attention.wq)
    torch.testing.assert_close(m(x), ref, rtol=0, atol=0)


def test_forward_trains():
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, tie_embeddings=True))
    x = torch.randint(0, 96, (2, 12))
    loss = nn.functional.cross_entropy(m(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    # causal: changing the last token leaves earlier logits alone
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 96
    with torch.no_grad():
        torch.testing.assert_close(m(x)[:, :-1], m(y)[:, :-1])


def _grads(m, x):
    m.zero_grad()
    out = m(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), [p.grad.clone() for p in m.parameters()]


def test_checkpointing_same_output_and_gradients():
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=96))
    x = torch.randint(0, 96, (2, 12))
    out0, g0 = _grads(m, x)
    m.checkpointing = True
    out1, g1 = _grads(m, x)
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():                   # no recomputation bookkeeping without gradients
        torch.testing.assert_close(m(x), out0, rtol=0, atol=0)


def test_recompute_swiglu_frees_h_and_changes_nothing():
    """With recompute_swiglu, autograd keeps no SwiGLU output alive (here every weight trains, so w2
    would save its input for its weight gradient) and backward gives the same bits."""
    import weakref
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=96))
    x = torch.randint(0, 96, (2, 12))
    seen = []
    for layer in m.layers:
        layer.feed_forward.w2.register_forward_pre_hook(lambda mod, args: seen.append(weakref.ref(args[0])))
    out0, g0 = _grads(m, x)
    for recompute, alive in ((False, 3), (True, 0)):
        m.recompute_swiglu, seen[:] = recompute, []
        out = m(x)                                     # its autograd graph alive, backward not yet run
        assert sum(ref() is not None for ref in seen) == alive
        del out
    m.recompute_swiglu = True
    out1, g1 = _grads(m, x)
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    m.checkpointing = True                             # checkpointing keeps no h either; recipes stay off
    out2, g2 = _grads(m, x)
    for a, b in zip(g2, g0):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_recompute_saved_shares_one_recomputation():
    """Two saves of one tensor (two views) run the recipe once; the copy is dropped after the last read."""
    calls = []

    def make(a):
        calls.append(1)
        return a * 2

    a = torch.randn(4, 6, requires_grad=True)
    w1, w2 = torch.randn(6, 3, requires_grad=True), torch.randn(3, 6, requires_grad=True)
    h = make(a.detach())
    h.requires_grad_(False)
    ref = (h @ w1).sum() + (h @ w2.T).sum()
    gw1, gw2 = torch.autograd.grad(ref, (w1, w2))
    calls.clear()
    with M.recompute_saved(h, make, a.detach()):
        y = (h @ w1).sum() + (h.view(2, 12).view(4, 6) @ w2.T).sum()
    assert calls == []
    torch.testing.assert_close(torch.autograd.grad(y, (w1, w2)), (gw1, gw2), rtol=0, atol=0)
    assert calls == [1]


def test_rotary_real_form_equals_complex_form():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 16)
    rope = M.rotary(torch.arange(5).expand(2, 5) + torch.tensor([[0], [7]]), 16, 10000.0)
    torch.testing.assert_close(M.apply_rotary_real(x, rope), M.apply_rotary(x, rope), rtol=1e-6, atol=1e-6)
    # a rotation: each pair keeps its length, and position 0 is the identity
    torch.testing.assert_close(M.apply_rotary(x, rope).norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(M.apply_rotary(x, rope)[0, 0], x[0, 0])


def test_compile_pointwise_matches_eager():
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96))
    x = torch.randint(0, 96, (2, 12))
    other = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96))
    out0, g0 = _grads(m, x)
    m.compile_pointwise()
    assert m.pointwise is not M.EAGER and other.pointwise is M.EAGER      # per model, not per module
    out1, g1 = _grads(m, x)
    m.compile_pointwise(False)
    assert m.pointwise is M.EAGER
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_hf_parity_float32(tmp_path, tied):
    hf = tiny_hf(tied=tied)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    model, tok = load_checkpoint(tmp_path)
    assert tok is None and model.args.tie_embeddings == tied and (model.output is None) == tied
    assert model.args.n_kv_heads == 2 and model.args.rope_theta == 500.0
    x = torch.randint(0, 96, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=0, atol=1e-5)


def test_hf_sharded_with_index(tmp_path, hf_folder):
    hf, single = hf_folder
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    a, _ = load_checkpoint(tmp_path)
    b, _ = load_checkpoint(single)
    x = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_hf_rope_theta_old_and_new_config_keys(tmp_path, hf_folder):
    hf, folder = hf_folder
    shutil.copytree(folder, tmp_path / "old")
    c = json.loads((folder / "config.json").read_text())
    c.pop("rope_parameters", None)
    c["rope_theta"] = 321.0
    (tmp_path / "old" / "config.json").write_text(json.dumps(c))
    assert load_checkpoint(tmp_path / "old")[0].args.rope_theta == 321.0
    assert load_checkpoint(folder)[0].args.rope_theta == 500.0


def _sentencepiece(data):
    """The data directory's LLaMA 2 tokenizer.model (conftest.py's small one, or LLaMA 2's with
    --data-dir) and the sentencepiece library's reading of it, the reference."""
    import sentencepiece
    path = data / "llama2-tokenizer" / "tokenizer.model"
    return path, sentencepiece.SentencePieceProcessor(model_file=str(path))


def test_hf_folder_tokenizer_model(tmp_path, hf_folder, data):
    tok_file, sp = _sentencepiece(data)
    shutil.copytree(hf_folder[1], tmp_path / "hf")
    os.symlink(tok_file, tmp_path / "hf" / "tokenizer.model")
    tok = hf_tokenizer(tmp_path / "hf")                 # the model's 96 rows are fewer than its tokens
    assert tok.encode("Hello world") == [sp.bos_id()] + sp.encode("Hello world")


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_format_same_logits(tmp_path, hf_folder, n_shards):
    hf, folder = hf_folder
    ours, _ = load_checkpoint(folder)
    write_meta(ours, tmp_path / "meta", n_shards=n_shards)
    loaded, tok = load_checkpoint(tmp_path / "meta")
    assert tok is None
    x = torch.randint(0, 96, (2, 30))
    with torch.no_grad():
        ref = hf(x).logits
        torch.testing.assert_close(loaded(x), ours(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), ref, rtol=0, atol=1e-5)


def test_meta_vocab_from_tokenizer_one_folder_up(tmp_path, data):
    tok_file, sp = _sentencepiece(data)
    vocab = sp.vocab_size()
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=vocab))
    write_meta(m, tmp_path / "llama-2-tiny", n_shards=2, vocab_size=-1)
    os.symlink(tok_file, tmp_path / "tokenizer.model")    # Meta's download: tokenizer.model one folder up
    loaded, tok = load_checkpoint(tmp_path / "llama-2-tiny")
    assert loaded.args.vocab_size == vocab and tok.vocab_size == vocab
    assert tok.encode("Hello world", bos=False) == sp.encode("Hello world")
    x = torch.randint(0, vocab, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)


def test_dtype_and_device_options(hf_folder):
    _, folder = hf_folder
    m, _ = load_checkpoint(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in m.parameters()} == {"cpu"}
    assert m(torch.randint(0, 96, (1, 5))).dtype == torch.float32


def test_greedy_matches_hf_generate(hf_folder):
    hf, folder = hf_folder
    model, _ = load_checkpoint(folder)
    torch.manual_seed(1)
    prompts = [torch.randint(0, 96, (n,)).tolist() for n in (3, 11, 6)]
    ours = generate(model, None, prompts, max_new_tokens=24)
    for p, o in zip(prompts, ours):
        x = torch.tensor([p])   # an explicit mask: else HF masks every id equal to pad_token_id
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, min_new_tokens=24,
                          do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert o == ref


# ---- bad input: every error names the file and the problem ----------------------------------


def test_missing_params_json(tmp_path, hf_folder):
    ours, _ = load_checkpoint(hf_folder[1])
    write_meta(ours, tmp_path, n_shards=1)
    (tmp_path / "params.json").unlink()
    with pytest.raises(ValueError, match=r"params\.json"):
        load_checkpoint(tmp_path)


def test_truncated_pth(tmp_path, hf_folder):
    ours, _ = load_checkpoint(hf_folder[1])
    write_meta(ours, tmp_path, n_shards=2)
    f = tmp_path / "consolidated.01.pth"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth.*truncated"):
        load_checkpoint(tmp_path)


def test_meta_shapes_disagree_with_params(tmp_path, hf_folder):
    ours, _ = load_checkpoint(hf_folder[1])
    write_meta(ours, tmp_path, n_shards=1)
    p = json.loads((tmp_path / "params.json").read_text())
    p["hidden_dim"] = 128
    (tmp_path / "params.json").write_text(json.dumps(p))
    with pytest.raises(ValueError, match=r"w1\.weight has shape \(112, 64\), the config says \(128, 64\)") as e:
        load_checkpoint(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_meta_missing_and_unexpected_keys(tmp_path, hf_folder):
    ours, _ = load_checkpoint(hf_folder[1])
    write_meta(ours, tmp_path, n_shards=1)
    f = tmp_path / "consolidated.00.pth"
    sd = torch.load(f)
    del sd["layers.1.ffn_norm.weight"]
    sd["layers.1.attention.bias"] = torch.zeros(3)
    torch.save(sd, f)
    with pytest.raises(ValueError, match=r"missing keys \['layers\.1\.ffn_norm\.weight'\].*"
                                         r"unexpected keys \['layers\.1\.attention\.bias'\]") as e:
        load_checkpoint(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_unsupported_params_key(tmp_path, hf_folder):
    ours, _ = load_checkpoint(hf_folder[1])
    write_meta(ours, tmp_path, n_shards=1)
    p = json.loads((tmp_path / "params.json").read_text())
    p["use_scaled_rope"] = True
    (tmp_path / "params.json").write_text(json.dumps(p))
    with pytest.raises(ValueError, match=r"params\.json: unsupported keys \['use_scaled_rope'\]"):
        load_checkpoint(tmp_path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no params.json .* or config.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "nothing.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "nothing.bin")
    for missing in ("x.gguf", "no-folder"):
        with pytest.raises(FileNotFoundError, match=rf"{missing}: no such checkpoint file or folder"):
            load_checkpoint(tmp_path / missing)


@pytest.fixture(scope="module")
def meta_model(hf_folder):
    return load_checkpoint(hf_folder[1])[0]


def _edit_json(file, edit):
    d = json.loads(file.read_text())
    edit(d)
    file.write_text(json.dumps(d))


def test_bad_json_names_file_and_line(tmp_path, meta_model, hf_folder):
    write_meta(meta_model, tmp_path / "meta", n_shards=1)
    shutil.copytree(hf_folder[1], tmp_path / "hf")
    for file in (tmp_path / "meta" / "params.json", tmp_path / "hf" / "config.json"):
        good = file.read_text()
        file.write_text('{\n  "dim": 64,\n  "n_layers" 2}')
        with pytest.raises(ValueError, match=rf"{file.name}: not valid JSON: Expecting ':' delimiter: line 3 column 14"):
            load_checkpoint(file.parent)
        file.write_text("[64, 2, 4]")
        with pytest.raises(ValueError, match=rf"{file.name}: holds a JSON list, not an object"):
            load_checkpoint(file.parent)
        file.write_text(good)
    (tmp_path / "hf" / "tokenizer.json").write_text('{"model": {"type": "BPE",}}')
    with pytest.raises(ValueError, match=r"tokenizer\.json: not valid JSON: .*line 1 column 26"):
        load_checkpoint(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text('["BPE"]')
    with pytest.raises(ValueError, match=r"tokenizer\.json: holds a JSON list, not an object"):
        load_checkpoint(tmp_path / "hf")


def test_params_wrong_type_or_missing_key(tmp_path, meta_model, hf_folder):
    params = write_meta(meta_model, tmp_path, n_shards=1) / "params.json"
    good = params.read_text()
    _edit_json(params, lambda p: p.update(dim="64"))
    with pytest.raises(ValueError, match=r"params\.json: ModelArgs: dim must be a positive integer, got '64'"):
        load_checkpoint(tmp_path)
    params.write_text(good)
    _edit_json(params, lambda p: p.update(rope_theta="500.0"))
    with pytest.raises(ValueError, match=r"params\.json: ModelArgs: rope_theta must be a positive number, got '500\.0'"):
        load_checkpoint(tmp_path)
    params.write_text(good)
    _edit_json(params, lambda p: [p.pop("n_layers"), p.pop("n_heads")])  # the 7B defaults must not stand in
    with pytest.raises(ValueError, match=r"params\.json: missing keys \['n_layers', 'n_heads'\]"):
        load_checkpoint(tmp_path)
    shutil.copytree(hf_folder[1], tmp_path / "hf")
    _edit_json(tmp_path / "hf" / "config.json", lambda c: c.update(rms_norm_eps="1e-6"))
    with pytest.raises(ValueError, match=r"config\.json: ModelArgs: norm_eps must be a positive number, got '1e-6'"):
        load_checkpoint(tmp_path / "hf")


@pytest.mark.parametrize("change, message", [
    (dict(norm_eps=float("nan")), "norm_eps must be a positive number, got nan"),
    (dict(rope_theta=0), "rope_theta must be a positive number, got 0"),
    (dict(rope_theta=float("inf")), "rope_theta must be a positive number, got inf"),
    (dict(vocab_size=-7), "vocab_size must be a positive integer, got -7"),
    (dict(hidden_dim=None, ffn_dim_multiplier=1e308), r"ffn_dim_multiplier 1e\+308 makes no finite FFN size"),
    (dict(n_layers=20000), r"the config says 20000 layers, the checkpoint holds 2 \(layers\.0 to layers\.1\)"),
])
def test_params_out_of_range_is_refused_before_building(tmp_path, meta_model, change, message):
    params = write_meta(meta_model, tmp_path, n_shards=1) / "params.json"
    _edit_json(params, lambda p: p.update(change))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + ".*" + message):
        load_checkpoint(tmp_path)


def test_a_shard_entry_that_is_no_tensor(tmp_path, meta_model):
    write_meta(meta_model, tmp_path, n_shards=1)
    shard = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    shard["layers.0.attention.wq.weight"] = 5
    torch.save(shard, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth: entry 'layers\.0\.attention\.wq\.weight' holds a "
                                         r"int; a shard maps names to tensors"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("n_shards", [1, 2])
def test_a_shard_tensor_that_is_a_view_or_not_floating_point_is_refused(tmp_path, meta_model, n_shards):
    # torch.zeros(1).expand(20000, 20000) is 4 bytes on disk and 1.6 GB once joined or copied
    key = "layers.0.attention.wq.weight"
    for bad, message in [(torch.zeros(1).expand(20000, 20000), r"is a \[20000, 20000\] view of 4 stored bytes"),
                         (torch.ones(64, 64, dtype=torch.int64), "holds torch.int64 values, not floating-point")]:
        write_meta(meta_model, tmp_path, n_shards=n_shards)
        shard = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
        shard[key] = bad
        torch.save(shard, tmp_path / "consolidated.00.pth")
        with pytest.raises(ValueError, match=r"consolidated\.00\.pth: " + re.escape(key) + " " + message):
            load_checkpoint(tmp_path)


def test_hf_shards_hold_each_tensor_once_where_the_index_says(tmp_path, hf_folder):
    from safetensors.torch import load_file, save_file
    hf, _ = hf_folder
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    index = tmp_path / "hf" / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    home, other = weight_map["model.norm.weight"], weight_map["model.embed_tokens.weight"]
    assert home != other
    extra = load_file(tmp_path / "hf" / other) | {"model.norm.weight": torch.full((64,), 1000.0)}
    save_file(extra, tmp_path / "hf" / other, metadata={"format": "pt"})   # a second copy the index does not name
    with pytest.raises(ValueError, match=rf"{re.escape(other)}: holds model\.norm\.weight, which "
                                         rf"model\.safetensors\.index\.json places in '{re.escape(home)}'"):
        load_checkpoint(tmp_path / "hf")
    single = tmp_path / "one"          # integer weights would be cast to floats without a word
    shutil.copytree(hf_folder[1], single)
    sd = load_file(single / "model.safetensors")
    sd["model.layers.0.input_layernorm.weight"] = sd["model.layers.0.input_layernorm.weight"].to(torch.int32)
    save_file(sd, single / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"input_layernorm\.weight holds torch\.int32 values, not floating-point"):
        load_checkpoint(single)


def test_hf_config_rope_scaling_that_is_not_an_object(tmp_path, hf_folder):
    shutil.copytree(hf_folder[1], tmp_path / "hf")
    _edit_json(tmp_path / "hf" / "config.json", lambda c: c.update(rope_scaling="linear"))
    with pytest.raises(ValueError, match=r"config\.json: rope_scaling should be an object, got 'linear'"):
        load_checkpoint(tmp_path / "hf")


def test_hf_index_names_only_files_of_its_folder(tmp_path, hf_folder):
    hf, _ = hf_folder
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    index = tmp_path / "hf" / "model.safetensors.index.json"
    first = json.loads(index.read_text())["weight_map"]["model.embed_tokens.weight"]
    shutil.move(tmp_path / "hf" / first, tmp_path / first)
    _edit_json(index, lambda d: d["weight_map"].update({"model.embed_tokens.weight": f"../{first}"}))
    with pytest.raises(ValueError, match=rf"index\.json: weight_map names '\.\./{first}', not a file in "):
        load_checkpoint(tmp_path / "hf")


def test_hf_rotary_rows_of_a_wrong_shape_are_named(tmp_path, hf_folder):
    from safetensors.torch import save_file
    hf, folder = hf_folder
    shutil.copytree(folder, tmp_path / "hf")
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    sd["model.layers.0.self_attn.q_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"][:30].contiguous()
    save_file(sd, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors: layers\.0\.attention\.wq\.weight has shape \(30, 64\), "
                                         r"not 4 heads' rows of rotary pairs"):
        load_checkpoint(tmp_path / "hf")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, hf_folder):
    from soka.tokenizer import bytes_to_unicode
    shutil.copytree(hf_folder[1], tmp_path / "hf")         # vocab_size 96
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())} | {"<|endoftext|>": 256}
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False},
        "added_tokens": [{"id": 256, "content": "<|endoftext|>", "special": True}]}))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    message = "vocab_size 96 is smaller than the tokenizer's 257 tokens"
    with pytest.raises(ValueError, match=message):
        load_checkpoint(tmp_path / "hf")
    with pytest.raises(ValueError, match=message):
        read_config(tmp_path / "hf")


def test_pth_holding_a_tensor(tmp_path, meta_model):
    write_meta(meta_model, tmp_path, n_shards=1)
    torch.save(torch.zeros(3), tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth: holds a Tensor, not a state dict"):
        load_checkpoint(tmp_path)


def test_stray_extra_shard(tmp_path, meta_model):
    write_meta(meta_model, tmp_path, n_shards=1)
    shutil.copy(tmp_path / "consolidated.00.pth", tmp_path / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"the 2 shards \['consolidated\.00\.pth', 'consolidated\.01\.pth'\] "
                                         r"join to dim 128, params\.json says 64: the shards disagree"):
        load_checkpoint(tmp_path)


def test_meta_vocab_smaller_than_tokenizer(tmp_path, data):
    tok_file, sp = _sentencepiece(data)
    n = sp.vocab_size()
    padded = n + 64                # embeddings padded past the tokenizer's vocabulary, which is normal
    for vocab in (96, padded):
        m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=vocab, hidden_dim=32))
        write_meta(m, tmp_path / str(vocab), n_shards=1)
        os.symlink(tok_file, tmp_path / str(vocab) / "tokenizer.model")
    with pytest.raises(ValueError, match=rf"params\.json: vocab_size 96 is smaller than the {n} tokens of "
                                         r".*tokenizer\.model"):
        load_checkpoint(tmp_path / "96")
    loaded, tok = load_checkpoint(tmp_path / str(padded))
    assert loaded.args.vocab_size == padded and tok.vocab_size == n
    # the padded rows are never generated, though they win every argmax here
    forward = loaded.forward

    def favour_padding(*args, **kwargs):
        logits = forward(*args, **kwargs)
        return logits + torch.where(torch.arange(logits.shape[-1]) >= n, 1e4, 0.0)
    loaded.forward = favour_padding
    prompt = [tok.encode("hello", bos=True)]
    assert loaded(torch.tensor(prompt))[0, -1].argmax() >= n
    for temperature in (0.0, 1.0):
        out = generate(loaded, tok, prompt, max_new_tokens=8, temperature=temperature, seed=0)[0]
        assert out and all(0 <= i < n for i in out)
        tok.decode(out)


def test_hf_index_without_weight_map(tmp_path, hf_folder):
    shutil.copytree(hf_folder[1], tmp_path / "hf")
    index = tmp_path / "hf" / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 1}}))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: no weight_map"):
        load_checkpoint(tmp_path / "hf")


def _rewrite_header(src, dst, edit):
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    dst.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])


def test_safetensors_header_that_lies(tmp_path, hf_folder):
    _, folder = hf_folder
    src = folder / "model.safetensors"
    key = "model.layers.0.mlp.up_proj.weight"
    cases = {
        "beyond": (lambda h: h[key].update(data_offsets=[h[key]["data_offsets"][0], 10**9]), "lie outside the file"),
        "shape": (lambda h: h[key].update(shape=[112, 65]), r"F32 \[112, 65\] = 29120 bytes, but its offsets span 28672"),
        "dtype": (lambda h: h[key].update(dtype="F8_E9M9"), "unsupported dtype"),
        "offsets": (lambda h: h[key].update(data_offsets=[0]), r"corrupt safetensors header: .*\[0\]"),
        "entry": (lambda h: h.update({key: [1, 2]}), r"corrupt safetensors header: .* is \[1, 2\], not"),
        "dtype list": (lambda h: h[key].update(dtype=["F32"]), r"unsupported dtype \['F32'\]"),
        "huge dim": (lambda h: h[key].update(shape=[0, 2**70]), r"corrupt safetensors header: .* has shape \[0, 1180.*\], a dimension longer than the file"),
    }
    for name, (edit, msg) in cases.items():
        d = tmp_path / name
        shutil.copytree(folder, d)
        _rewrite_header(src, d / "model.safetensors", edit)
        with pytest.raises(ValueError, match=msg) as e:
            load_checkpoint(d)
        assert "model.safetensors" in str(e.value) and key in str(e.value)
    d = tmp_path / "twice"        # a name twice in the header: json.loads alone would keep the second
    shutil.copytree(folder, d)
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    entry = json.dumps(json.loads(raw[8:8 + n])[key]).encode()
    h = raw[8:8 + n].rstrip()[:-1] + b', "' + key.encode() + b'": ' + entry + b"}"
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])
    with pytest.raises(ValueError, match=rf"model\.safetensors: corrupt safetensors header: '{re.escape(key)}' appears twice"):
        load_checkpoint(d)
    for name, body, message in [("list", b"[1, 2]", "corrupt safetensors header: a JSON list, not an object"),
                                ("deep", b"[" * 100_000 + b"]" * 100_000, "header is JSON nested too deeply")]:
        d = tmp_path / name       # a JSON list where the header object goes; a RecursionError in json
        shutil.copytree(folder, d)
        (d / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body)
        with pytest.raises(ValueError, match=r"model\.safetensors: " + message):
            load_checkpoint(d)
    # a header size larger than the file
    d = tmp_path / "size"
    shutil.copytree(folder, d)
    raw = src.read_bytes()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    with pytest.raises(ValueError, match=r"model\.safetensors: header claims"):
        load_checkpoint(d)
    # a truncated file: the last tensors' offsets now lie beyond its end
    (d / "model.safetensors").write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(ValueError, match="lie outside the file"):
        load_checkpoint(d)


def test_safetensors_reader_matches_library(hf_folder):
    from safetensors.torch import load_file
    f = hf_folder[1] / "model.safetensors"
    ours, ref = read_safetensors(f), load_file(f)
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k])


def test_hf_config_disagrees_with_weights(tmp_path, hf_folder):
    _, folder = hf_folder
    shutil.copytree(folder, tmp_path / "a")
    c = json.loads((folder / "config.json").read_text())
    c["num_hidden_layers"] = 3
    (tmp_path / "a" / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match=r"a: the config says 3 layers, the checkpoint holds 2 \(layers\.0 to layers\.1\)"):
        load_checkpoint(tmp_path / "a")
    c["num_hidden_layers"] = 2
    c["intermediate_size"] = 100
    (tmp_path / "a" / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match=r"w1\.weight has shape \(112, 64\), the config says \(100, 64\)"):
        load_checkpoint(tmp_path / "a")
    del c["hidden_size"]
    (tmp_path / "a" / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match=r"config\.json: missing key 'hidden_size'"):
        load_checkpoint(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").unlink()
    (tmp_path / "a" / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_checkpoint(tmp_path / "a")


# ---- the real SmolLM2 weights: our GGUF path against transformers' GGUF loader --------------

@pytest.fixture(scope="module")
def smollm2(demo_gguf):
    ours, tok = load_checkpoint(demo_gguf)
    ref = transformers.AutoModelForCausalLM.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name,
                                                            dtype=torch.float32).eval()
    return ours, tok, ref


def test_smollm2_config(smollm2):
    ours, tok, _ = smollm2
    a = ours.args
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.ffn_dim) == (576, 30, 9, 3, 49152, 1536)
    assert a.tie_embeddings and ours.output is None and a.rope_theta == 100000.0
    assert tok.eos_id == 2 and tok.vocab_size == 49152


def test_smollm2_logits_match_transformers(smollm2, gsm8k_rows):
    ours, tok, ref = smollm2
    q = gsm8k_rows["test"][0]["question"]
    ids = torch.tensor([tok.encode(tok.chat_prompt(q))])
    with torch.no_grad():
        a, b = ours(ids), ref(ids).logits
    # Both dequantize the same Q4_1/Q8_0 blocks to float32 (bit-equal weights); what is left is float32
    # rounding over 30 layers: measured 1.1e-4 on logits of magnitude up to 40.
    assert (a - b).abs().max() < 1e-3
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_smollm2_greedy_continuation(smollm2):
    ours, tok, ref = smollm2
    prompt = tok.encode(tok.chat_prompt("What is the capital of France?"))
    out = generate(ours, tok, [prompt], max_new_tokens=12)[0]
    x = torch.tensor([prompt])
    expect = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                          eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
    if expect and expect[-1] == tok.eos_id:
        expect = expect[:-1]
    assert out == expect
    assert "Paris" in tok.decode(out)


def test_add_rms_norm_is_the_add_then_the_norm():
    torch.manual_seed(0)
    x, d = torch.randn(2, 3, 8, dtype=torch.bfloat16), torch.randn(2, 3, 8, dtype=torch.bfloat16)
    w = torch.randn(8, dtype=torch.bfloat16)
    h, n = M.add_rms_norm(x, d, w, 1e-5)
    assert torch.equal(h, x + d) and torch.equal(n, M.rms_norm(x + d, w, 1e-5))
