"""soka/export.py: a merged model written as a Meta folder and as an HF folder loads back, through
model.load_checkpoint and through transformers' LlamaForCausalLM, to the same logits; a folder that
holds a checkpoint is refused unless overwrite=True, which leaves no stale shard or index behind.

    python -m pytest -q tests/test_export.py
"""
import json
import os
from pathlib import Path

import pytest
import safetensors.torch as safetensors_torch
import torch
import torch.nn.functional as F
import transformers

from model import ModelArgs, Transformer, load_checkpoint
from soka import inject
from soka.adapters import adapter_layers
from soka.checkpoints import permute_rotary, unpermute_rotary
from soka.export import export_hf, export_meta, merged_state_dict, write_safetensors

TOKENS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))


def adapted(*, tied=False, method="soka"):
    """A tiny GQA model with adapters on all seven linear types, moved off step 0 by two AdamW steps."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96,
                                  max_seq_len=64, rope_theta=500.0, tie_embeddings=tied))
    inject(model, method, ("wq", "wk", "wv", "wo", "w1", "w2", "w3"), rank=3, verbose=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(2):
        logits = model(TOKENS[:, :-1])
        F.cross_entropy(logits.reshape(-1, 97), TOKENS[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_meta_and_hf_load_back_to_the_same_logits(tied, tmp_path):
    model = adapted(tied=tied)
    with torch.no_grad():
        want = model(TOKENS)
    tol = 1e-5 * want.abs().max().item()
    export_meta(model, tmp_path / "meta")
    export_hf(model, tmp_path / "hf")
    assert not any(l.merged for _, l in adapter_layers(model))     # exporting leaves the model alone
    assert not list(tmp_path.rglob("*.part"))                  # no temporary file left (soka/files.py)

    for folder in ("meta", "hf"):
        ours, _ = load_checkpoint(tmp_path / folder)
        assert not adapter_layers(ours)
        with torch.no_grad():
            torch.testing.assert_close(ours(TOKENS), want, rtol=0, atol=tol)

    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.tie_word_embeddings == tied and hf.config.num_key_value_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, want, rtol=0, atol=tol)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["tie_embeddings"] == tied and params["n_kv_heads"] == 2 and params["rope_theta"] == 500.0


def test_merged_state_dict_has_base_keys_and_merged_weights():
    model = adapted(method="pissa")
    sd = merged_state_dict(model)
    torch.manual_seed(0)
    plain = Transformer(model.args)
    assert set(sd) == set(plain.state_dict())                     # no A, B, sigma, U, V left
    wq = model.layers[0].attention.wq
    torch.testing.assert_close(sd["layers.0.attention.wq.weight"], wq.weight + wq.B @ wq.A, rtol=0, atol=1e-6)


def test_permute_rotary_inverts_unpermute():
    w = torch.randn(4 * 16, 24)
    assert torch.equal(unpermute_rotary(permute_rotary(w, 4), 4), w)
    assert torch.equal(permute_rotary(unpermute_rotary(w, 4), 4), w)
    # HF row h·hd + j·hd/2 + i holds Meta row h·hd + 2i + j
    hd = 16
    p = permute_rotary(w, 4)
    for h, i, j in ((0, 0, 1), (2, 5, 0), (3, 7, 1)):
        assert torch.equal(p[h * hd + j * hd // 2 + i], w[h * hd + 2 * i + j])


def test_write_safetensors_is_read_by_the_safetensors_package(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a.f32": torch.randn(3, 5, generator=g), "b.bf16": torch.randn(7, generator=g).bfloat16(),
               "c.f16": torch.randn(2, 2, 2, generator=g).half(), "d.f64": torch.randn(1, generator=g).double(),
               "e.i64": torch.arange(5), "f.empty": torch.zeros(0, 4), "g.bool": torch.tensor([True, False, True]),
               "h.view": torch.randn(6, 6, generator=g)[::2, 1:4]}           # non-contiguous input
    write_safetensors(tmp_path / "x.safetensors", tensors, metadata={"note": "test"})
    back = safetensors_torch.load_file(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    raw = (tmp_path / "x.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and json.loads(raw[8:8 + n])["__metadata__"] == {"format": "pt", "note": "test"}
    with pytest.raises(ValueError, match="complex64"):
        write_safetensors(tmp_path / "y.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)})


def plain(seed):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96,
                                 max_seq_len=64)).eval()


def logits_of(folder):
    with torch.no_grad():
        return load_checkpoint(folder)[0](TOKENS)


def test_export_meta_refuses_a_checkpoint_folder_and_overwrite_leaves_no_stale_shard(tmp_path):
    # The base's own 2-shard Meta folder: writing one shard over it would leave consolidated.01.pth,
    # which the loader would read back beside the new consolidated.00.pth.
    a, b = plain(0), plain(1)
    folder = export_meta(a, tmp_path / "base")
    (folder / "consolidated.01.pth").write_bytes((folder / "consolidated.00.pth").read_bytes())
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    with pytest.raises(FileExistsError, match=r"base.*already holds a checkpoint.*consolidated\.01\.pth.*overwrite"):
        export_meta(b, folder)
    with pytest.raises(FileExistsError, match="params.json"):   # the other format is refused too
        export_hf(b, folder)
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before      # refused: nothing touched
    export_meta(b, folder, overwrite=True)
    assert sorted(f.name for f in folder.iterdir()) == ["consolidated.00.pth", "params.json"]
    with torch.no_grad():
        assert torch.equal(logits_of(folder), b(TOKENS))


def test_export_hf_overwrite_removes_the_old_index_that_would_shadow_the_new_weights(tmp_path):
    a, b = plain(0), plain(1)
    folder = export_hf(a, tmp_path / "hf")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    keys = safetensors_torch.load_file(folder / "model-00001-of-00001.safetensors")
    index = {"weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "generation_config.json").write_text("{}")         # not a checkpoint file: kept
    with torch.no_grad():
        assert torch.equal(logits_of(folder), a(TOKENS))           # the loader follows the index
    with pytest.raises(FileExistsError, match=r"model\.safetensors\.index\.json"):
        export_hf(b, folder)
    export_hf(b, folder, overwrite=True)
    assert sorted(f.name for f in folder.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    with torch.no_grad():
        assert torch.equal(logits_of(folder), b(TOKENS))


def test_an_interrupted_overwrite_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    # Ctrl-C while the new weights are written: the old weights and config stay, no temporary file
    a, b = plain(0), plain(1)
    folder = export_meta(a, tmp_path / "m")
    before = {f.name: f.read_bytes() for f in folder.iterdir()}

    def interrupted(obj, path):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_meta(plain(1), folder, overwrite=True)
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before
    monkeypatch.undo()
    export_meta(b, folder, overwrite=True)
    with torch.no_grad():
        assert torch.equal(logits_of(folder), b(TOKENS))


def test_ctrl_c_during_the_renames_waits_until_the_set_is_whole(tmp_path, monkeypatch):
    import signal
    from soka import files
    (tmp_path / "a").write_text("old a")
    (tmp_path / "b").write_text("old b")
    real = os.replace

    def replace_with_ctrl_c(src, dst):       # Ctrl-C arrives after the first rename
        real(src, dst)
        if Path(dst).name == "a":
            signal.raise_signal(signal.SIGINT)
    monkeypatch.setattr(files.os, "replace", replace_with_ctrl_c)
    with pytest.raises(KeyboardInterrupt):   # raised once both files are in place
        files.replace_files({tmp_path / "a": lambda p: p.write_text("new a"),
                             tmp_path / "b": lambda p: p.write_text("new b")})
    assert (tmp_path / "a").read_text() == "new a" and (tmp_path / "b").read_text() == "new b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_export_into_a_read_only_folder_names_it(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):     # root ignores permission bits: answer as a read-only mount does
        monkeypatch.setattr(os, "access", lambda path, mode: False)
    try:
        for export in (export_meta, export_hf):
            with pytest.raises(PermissionError, match=r"export\.py: cannot write into .*ro\b"):
                export(plain(0), folder)
    finally:
        folder.chmod(0o755)
