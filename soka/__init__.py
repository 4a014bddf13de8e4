"""soka: the SoKA adapter and everything around it that is not the model or the Kronecker math.

    adapters.py   SoKA, LoRA and PiSSA layers; inject, compress, merge, unmerge, save_adapter, load_adapter
    kron_fused.py the SoKA layer's Kronecker part as two Triton kernels (the default on a GPU)
    export.py     a merged model written as a Meta checkpoint or an HF safetensors folder
    gguf.py       a GGUF reader with hand-written dequantization (the SmolLM2 demo model)
    tokenizer.py  SentencePiece (LLaMA 2) and byte-level BPE (SmolLM2) behind one interface
    tasks.py      GSM8K, MATH and MBPP: files, downloader, prompts, training examples
    scorers.py    gsm8k_extract, math_last_boxed, math_equal
    sandbox.py    mbpp_run: model-written code in a locked-down child process
    evaluate.py   batched generation over a split, scoring, a results file

Names are imported on first use (PEP 562), so `model.py` can read a GGUF file through
`soka.gguf` without importing the adapters.
"""
import importlib

_WHERE = {
    "inject": "adapters", "compress": "adapters", "merge": "adapters", "unmerge": "adapters",
    "save_adapter": "adapters", "load_adapter": "adapters",
    "gsm8k_extract": "scorers", "math_last_boxed": "scorers", "math_equal": "scorers",
    "mbpp_run": "sandbox",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"soka.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'soka' has no attribute {name!r}")
