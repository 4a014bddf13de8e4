"""Test set-up that must happen before any test module imports soka.

Without CUDA, the Triton kernels (soka/kron_fused.py) run only under Triton's interpreter, which
TRITON_INTERPRET=1 turns on. Triton reads it once, when it is first imported or first decorates a
kernel, and soka.adapters imports the kernels, so it is set here: pytest imports conftest.py before
any test module.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from triton.runtime import interpreter
    except ImportError:       # no triton: the fused-kernel tests skip
        interpreter = None
    if interpreter is not None and hasattr(interpreter, "_patch_lang_tensor"):
        # Triton's interpreter (3.5-3.8) turns a runtime loop bound into an int with int() of a
        # 1-element array, which numpy ≥ 2.4 refuses; .item() is what it means. From 3.6 the
        # patched function takes a scope argument too: passed through.
        _patch_lang_tensor = interpreter._patch_lang_tensor

        def _patch_lang_tensor_item(tensor, *args):
            _patch_lang_tensor(tensor, *args)
            tensor.__index__ = lambda self: int(self.handle.data.item())
        interpreter._patch_lang_tensor = _patch_lang_tensor_item
