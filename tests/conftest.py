"""Without CUDA, Triton kernels (soka/kron_fused.py) can run only under Triton's interpreter, which
TRITON_INTERPRET=1 turns on. Triton reads it once, when it is first imported or first decorates a
kernel, and other test modules import it indirectly (torch's compiler stack, transformers), so it is
set here: pytest imports conftest.py before any test module."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
