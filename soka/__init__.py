"""soka: the SoKA adapter and everything around the model that is not the model or the Kronecker math.

    adapters.py     SoKA (reference forward), LoRA and PiSSA layers; inject, compress, merge, save, load
    kron_fused.py   the SoKA layer's fast path: its Kronecker part in two Triton kernels (GPU default)
    tokenizer.py    SentencePiece (LLaMA 2) and byte-level BPE (SmolLM2) behind one interface
    gguf.py         a GGUF reader with hand-written dequantization (the SmolLM2 demo model)
    checkpoints.py  the Hugging Face reader (config.json + safetensors) and the demo model's file
    export.py       a merged model written as a Meta checkpoint or an HF safetensors folder
    tasks.py        GSM8K, MATH and MBPP: files, downloader, prompts, training examples
    scorers.py      gsm8k_extract, math_last_boxed, math_equal
    sandbox.py      mbpp_run: model-written code in a locked-down child process
    evaluate.py     batched generation over a split, scoring, a results file
    runs.py         a training run's folder: options, resume, checkpoints, curves
    steps.py        one training micro-step: the chunked loss and its CUDA-graph replay
    fsdp.py         train.py --fsdp: the frozen base sharded over processes, the adapters replicated
    files.py        files written whole, and a set of them renamed together

Imports run one way: kpsvd.py, rank_select.py <- soka/ <- model.py <- train.py. Nothing here imports
model.py or train.py; model.py reads Hugging Face and GGUF files through checkpoints.py and gguf.py.
"""
from soka.adapters import compress, inject, load_adapter, merge, save_adapter, unmerge
from soka.sandbox import mbpp_run
from soka.scorers import gsm8k_extract, math_equal, math_last_boxed

__all__ = ["compress", "gsm8k_extract", "inject", "load_adapter", "math_equal", "math_last_boxed",
           "mbpp_run", "merge", "save_adapter", "unmerge"]
