"""Export a model with its adapters merged: a Meta checkpoint folder or a Hugging Face folder.

    export_meta(model, "out/meta")   # params.json + consolidated.00.pth  (model.load_checkpoint reads it)
    export_hf(model, "out/hf")       # config.json + model.safetensors    (transformers' LlamaForCausalLM too)
    export_hf(model, "out/hf", overwrite=True)    # replace the checkpoint already there

Merging happens on copies (merged_state_dict), so the model itself is left as it was. The HF folder
carries no tokenizer: the model does not hold one; copy the base's tokenizer files beside it.
A folder that already holds a checkpoint is refused unless overwrite=True. Then the new files replace
the old ones, and every other checkpoint file there (CHECKPOINT_FILES) is removed with them: an old
shard or index left beside the new files would be read in their place (model.load_checkpoint follows
params.json before config.json, and an index before model.safetensors). The files are written whole
under temporary names first and renamed together (soka/files.py), so an export stopped by an error
or Ctrl-C leaves the old checkpoint or the new one, never a mix.
"""
import dataclasses
import json
import os
import struct
from pathlib import Path

import torch

from soka.adapters import adapter_layers
from soka.checkpoints import meta_to_hf_key, permute_rotary
from soka.files import replace_files


def merged_state_dict(model):
    """The model's state dict under Meta's keys with every adapter folded in: `name.weight` =
    W_res + ΔW (float32 sum, rounded once to the model's dtype), factor tensors dropped."""
    layers = dict(adapter_layers(model))
    out = {}
    for key, t in model.state_dict().items():
        name, _, leaf = key.rpartition(".")
        if name in layers:
            if leaf == "weight":
                out[key] = layers[name].merged_weight()
            continue              # sigma, U, V / A, B: folded into the weight
        out[key] = t.detach()
    return out


# What model.load_checkpoint reads in a folder, both formats: Meta's, then Hugging Face's.
CHECKPOINT_FILES = ("params.json", "consolidated.*.pth", "config.json", "*.safetensors", "*.safetensors.index.json")


def _prepare(folder, overwrite):
    """(folder, the checkpoint files it holds): created, or checked to be writable and, unless
    overwrite, to hold no checkpoint."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"export.py: cannot write into {folder} (read-only file system or no permission)")
    old = sorted({f for pattern in CHECKPOINT_FILES for f in folder.glob(pattern) if f.is_file()})
    if old and not overwrite:
        raise FileExistsError(f"export.py: {folder} already holds a checkpoint ({', '.join(f.name for f in old)}); "
                              "choose another folder, or pass overwrite=True to replace it")
    return folder, old


def export_meta(model, folder, *, overwrite=False):
    """params.json (model.args, ModelArgs' fields) and consolidated.00.pth (one shard)."""
    folder, old = _prepare(folder, overwrite)
    params = dataclasses.asdict(model.args)
    sd = {k: v.cpu().contiguous().clone() for k, v in merged_state_dict(model).items()}  # own storage each
    new = {folder / "consolidated.00.pth": lambda p: torch.save(sd, p),
           folder / "params.json": lambda p: p.write_text(json.dumps(params, indent=2) + "\n")}
    replace_files(new, remove=[f for f in old if f not in new])   # the old checkpoint, or the new one
    return folder


def hf_config(args, dtype):
    """config.json for LlamaForCausalLM; rope base written both ways (transformers 4 and 5)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "hidden_act": "silu", "rms_norm_eps": args.norm_eps, "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_embeddings,
        "rope_theta": args.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "attention_bias": False, "mlp_bias": False, "torch_dtype": str(dtype).removeprefix("torch."),
    }


def export_hf(model, folder, *, overwrite=False):
    """config.json + model.safetensors in HF's layout: renamed keys, wq/wk rows permuted back to the
    half-rotation RoPE layout per head, no lm_head when the embeddings are tied."""
    args = model.args
    folder, old = _prepare(folder, overwrite)
    tensors = {}
    for key, t in merged_state_dict(model).items():
        hf = meta_to_hf_key(key)
        if key.endswith("wq.weight"):
            t = permute_rotary(t, args.n_heads)
        elif key.endswith("wk.weight"):
            t = permute_rotary(t, args.n_kv_heads)
        tensors[hf] = t
    dtype = next(iter(tensors.values())).dtype
    new = {folder / "model.safetensors": lambda p: write_safetensors(p, tensors),
           folder / "config.json": lambda p: p.write_text(json.dumps(hf_config(args, dtype), indent=2) + "\n")}
    replace_files(new, remove=[f for f in old if f not in new])
    return folder


_ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


def write_safetensors(path, tensors, metadata=None):
    """{name: tensor} → a .safetensors file: 8-byte little-endian header size N, N bytes of JSON
    {name: {dtype, shape, data_offsets}} padded with spaces to a multiple of 8, then the raw bytes
    (little-endian, as torch stores them on every platform we run on), in name order."""
    header, offset, order = {}, 0, sorted(tensors)
    for name in order:
        t = tensors[name]
        if t.dtype not in _ST_NAMES:
            raise ValueError(f"write_safetensors: {name} has dtype {t.dtype}, safetensors has no name for it")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            t = tensors[name].detach().cpu().contiguous().reshape(-1)
            if t.numel():
                f.write(t.view(torch.uint8).numpy().tobytes())
