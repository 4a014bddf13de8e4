"""Our PiSSA and LoRA against PEFT's on the same tiny HF LlamaForCausalLM (an outside implementation).

HF stores wq/wk rows permuted per head (half-rotation RoPE); our model holds Meta's order, W_meta =
P·W_hf for a row permutation P. The SVD of P·W is (P·U) S Vᵀ, so PiSSA on our side must give
A_meta = A_hf, B_meta = P·B_hf and W_res,meta = P·W_res,hf, each singular pair up to a sign.

    python -m pytest -q tests/test_peft_parity.py
"""
import copy

import peft
import pytest
import torch
import transformers

from model import load_checkpoint
from soka.checkpoints import unpermute_rotary
from soka import inject
from soka.adapters import adapter_layers

TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
HF_NAMES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
            "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}
TARGETS = tuple(HF_NAMES)
RANK = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random GQA LlamaForCausalLM (4 query heads, 2 key/value heads), and our load of its folder."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=500.0, max_position_embeddings=128,
        initializer_range=0.1)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    # Random matrices have near-tied singular values, whose vectors float32 SVD cannot pin down;
    # separate the top ones (σ_k + 4·0.6^k), as pretrained weights have them.
    with torch.no_grad():
        for name, mod in hf.named_modules():
            if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
                U, S, Vh = torch.linalg.svd(mod.weight.double(), full_matrices=False)
                S = S + 4 * 0.6 ** torch.arange(len(S), dtype=torch.float64)
                mod.weight.copy_(U @ torch.diag(S) @ Vh)
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)
    return hf, folder


def to_meta(t, leaf, cfg):
    """Rows of an HF (d_out, ·) matrix in Meta's order."""
    if leaf == "wq":
        return unpermute_rotary(t, cfg.num_attention_heads)
    if leaf == "wk":
        return unpermute_rotary(t, cfg.num_key_value_heads)
    return t


def peft_layers(peft_model):
    """{our name: PEFT's LoRA layer} for every adapted module."""
    mods = dict(peft_model.named_modules())
    out = {}
    for i in range(peft_model.config.num_hidden_layers):
        for leaf, hf in HF_NAMES.items():
            part = "attention" if leaf.startswith("w") and leaf[1] in "qkvo" else "feed_forward"
            out[f"layers.{i}.{part}.{leaf}"] = mods[f"base_model.model.model.layers.{i}.{hf}"]
    return out


def test_pissa_residual_and_factors_match_peft(tiny):
    hf, folder = tiny
    cfg = hf.config
    ref = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=RANK, lora_alpha=RANK, lora_dropout=0.0, init_lora_weights="pissa",
        target_modules=[v.split(".")[1] for v in HF_NAMES.values()])).eval()
    ours, _ = load_checkpoint(folder)
    base_logits = ours(TOKENS)
    inject(ours, "pissa", TARGETS, rank=RANK, verbose=False)
    theirs = peft_layers(ref)
    layers = dict(adapter_layers(ours))
    assert layers.keys() == theirs.keys() and len(layers) == 14
    for name, layer in layers.items():
        leaf = name.rsplit(".", 1)[-1]
        A = theirs[name].lora_A["default"].weight.detach()                    # (r, d_in)
        B = to_meta(theirs[name].lora_B["default"].weight.detach(), leaf, cfg)   # (d_out, r)
        W_res = to_meta(theirs[name].base_layer.weight.detach(), leaf, cfg)
        s = torch.sign((layer.A * A).sum(1)).detach()                          # one sign per singular pair
        assert (s != 0).all()
        scale = A.abs().max().item()
        torch.testing.assert_close(layer.A.detach(), s[:, None] * A, rtol=0, atol=1e-5 * scale, msg=name)
        torch.testing.assert_close(layer.B.detach(), B * s, rtol=0, atol=1e-5 * B.abs().max().item(), msg=name)
        torch.testing.assert_close(layer.weight, W_res, rtol=0, atol=1e-5 * W_res.abs().max().item(), msg=name)
    with torch.no_grad():
        want = ref(TOKENS).logits
        torch.testing.assert_close(ours(TOKENS), want, rtol=0, atol=1e-5 * want.abs().max().item())
        torch.testing.assert_close(want, base_logits, rtol=0, atol=1e-5 * want.abs().max().item())   # step 0


@pytest.mark.parametrize("alpha", [RANK, 3 * RANK], ids=["scale1", "scale3"])
def test_lora_forward_matches_peft_for_the_same_factors(tiny, alpha):
    hf, folder = tiny
    cfg = hf.config
    ref = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=RANK, lora_alpha=alpha, lora_dropout=0.0,
        target_modules=[v.split(".")[1] for v in HF_NAMES.values()])).eval()
    ours, _ = load_checkpoint(folder)
    inject(ours, "lora", TARGETS, rank=RANK, alpha=alpha, verbose=False)
    g = torch.Generator().manual_seed(2)
    theirs = peft_layers(ref)
    for name, layer in adapter_layers(ours):
        peft_layer = theirs[name]
        B = 0.1 * torch.randn(peft_layer.lora_B["default"].weight.shape, generator=g)   # B ≠ 0: a trained state
        with torch.no_grad():
            peft_layer.lora_B["default"].weight.copy_(B)
            layer.A.copy_(peft_layer.lora_A["default"].weight)
            layer.B.copy_(to_meta(B, name.rsplit(".", 1)[-1], cfg))
        assert layer.scale == peft_layer.scaling["default"] == alpha / RANK
    with torch.no_grad():
        want = ref(TOKENS).logits
        assert (want - hf(TOKENS).logits).abs().max() > 1e-2        # the adapters do change the model
        torch.testing.assert_close(ours(TOKENS), want, rtol=0, atol=1e-5 * want.abs().max().item())
