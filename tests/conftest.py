"""Without a GPU, Triton kernels (``trainer.attention``) run in Triton's interpreter on CPU
tensors; the variable is read when a kernel is defined, so before any test imports them."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
