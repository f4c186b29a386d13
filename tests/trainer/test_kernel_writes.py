"""What Inductor believes our ``triton_op`` kernels write.

Compiled, a user-defined Triton kernel's launch is analysed (its Triton IR) for the tensors
it stores to; a tensor the analysis cannot clear counts as written, and an input that is
written but used later (a saved activation) is copied first: one extra pass over, e.g., the
MLP's 64k x 3072 activation in every layer (BENCHMARKS.md P1, session 10). The analysis needs
only the IR, so it runs here for an H100/H200 target without a GPU, in a process of its own
(the other tests run Triton's interpreter, whose kernels have no IR)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r'''
import json, sys, torch
try:
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from torch._higher_order_ops import triton_kernel_wrap as wrap
except ImportError as e:
    print(json.dumps({"skip": str(e)})); sys.exit(0)

class Hopper:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

driver.set_active(Hopper())
from trainer import dropout, gelu, loss, norm

def written(kernel, **kwargs):
    if hasattr(wrap, "identify_accessed_tensors"):  # torch >= 2.12
        accesses = wrap.identify_accessed_tensors(kernel, kwargs, {})
        return sorted(dep.name for dep in accesses.read_writes.writes)
    if hasattr(wrap, "identify_mutated_tensors"):
        return sorted(wrap.identify_mutated_tensors(kernel, kwargs, {}))
    print(json.dumps({"skip": "no kernel analysis in this torch"})); sys.exit(0)

DTYPES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.bool: "i1", torch.int64: "i64"}

def compile_error(kernel, **kwargs):
    """Compile ``kernel`` for sm_90 with its arguments typed as Inductor types a dynamic
    graph's: Python floats as float64, ints as int32. The error text, or what of its Triton IR
    computes in float64 beside the argument's conversion, or None."""
    from triton import compile
    from triton.compiler import ASTSource
    constexprs = {p.name for p in kernel.params if p.is_constexpr}
    signature = {name: "constexpr" if name in constexprs else
                 "*" + DTYPES[value.dtype] if isinstance(value, torch.Tensor) else
                 "fp64" if isinstance(value, float) else "i32"
                 for name, value in kwargs.items()}
    constants = {name: kwargs[name] for name in constexprs}
    try:
        done = compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4})
    except Exception as e:  # the message is the test's failure text
        return f"{type(e).__name__}: {str(e)[-600:]}"
    wide = [line.strip() for line in done.asm["ttir"].splitlines() if "f64" in line
            and "tt.func" not in line and "f64 to f32" not in line]
    return f"float64 arithmetic: {wide[:3]}" if wide else None

x, b = torch.empty(64, 256, dtype=torch.bfloat16), torch.empty(256)
tile = dict(M=64, N=256, stride=256, BLOCK_M=32, BLOCK_N=128, FAST_ERF=True)
z, f = torch.empty(8, 1000, dtype=torch.bfloat16), torch.empty(8)
t = torch.zeros(8, dtype=torch.long)
ce = dict(V=1000, stride=1000, smoothing=0.1, ignore=-100, BLOCK=1024)
CASES = {
    "gelu_forward": (gelu._gelu_forward_kernel, dict(x=x, b=b, y=torch.empty_like(x), **tile)),
    "gelu_backward": (gelu._gelu_backward_kernel, dict(
        x=x, b=b, dy=torch.empty_like(x), dx=torch.empty_like(x), partial=torch.empty(2, 256),
        **tile)),
    "ce_forward": (loss._ce_forward_kernel, dict(
        z=z, targets=t, loss=f, nll=f.clone(), lse_out=f.clone(), **ce)),
    "ce_backward": (loss._ce_backward_kernel, dict(
        z=z, targets=t, lse=f, g_loss=f.clone(), g_nll=f.clone(), dz=torch.empty_like(z),
        d_stride=1000, g_stride=1, **ce)),
    "norm_forward": (norm._norm_forward_kernel, dict(
        x=x, branch=x.clone(), branch_bias=b.clone(), mask=torch.zeros(64, 256, dtype=torch.bool),
        row_scale=b, weight=b.clone(), bias=b.clone(), y=torch.empty_like(x),
        mean_out=torch.empty(64), rstd_out=torch.empty(64), M=64, C=256, T=8, keep_scale=1.1,
        eps=1e-5, HAS_BIAS=True, HAS_MASK=True, HAS_SCALE=True, ROWS=8, STEPS=2, BLOCK_C=256)),
    "norm_backward": (norm._norm_backward_kernel, dict(
        x=x, branch=x.clone(), branch_bias=b.clone(), mask=torch.zeros(64, 256, dtype=torch.bool),
        row_scale=b, weight=b.clone(), mean_in=torch.empty(64), rstd_in=torch.empty(64),
        dy=x.clone(), dx=torch.empty_like(x), dbranch=torch.empty_like(x),
        partial_w=torch.empty(4, 256), partial_b=torch.empty(4, 256),
        partial_bb=torch.empty(4, 256), M=64, C=256, T=8, keep_scale=1.1,
        HAS_BIAS=True, HAS_MASK=True, HAS_SCALE=True, ROWS=8, STEPS=2, BLOCK_C=256)),
    "dropout_mask": (dropout._mask_kernel, dict(
        seed_ptr=torch.zeros(1, dtype=torch.long), out=torch.empty(4096, dtype=torch.bool),
        n=4096, threshold=6554, BLOCK=4096)),
}
print(json.dumps({"writes": {k: written(f, **kw) for k, (f, kw) in CASES.items()},
                  "fp64": {k: compile_error(f, **kw) for k, (f, kw) in CASES.items()}}))
'''


@pytest.fixture(scope="module")
def analysis() -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(f"no kernel analysis here: {out['skip']}")
    return out


KERNELS = ["gelu_forward", "gelu_backward", "ce_forward", "ce_backward", "dropout_mask",
           "norm_forward", "norm_backward"]


@pytest.mark.parametrize(("kernel", "outputs"), [
    ("gelu_forward", ["y"]), ("gelu_backward", ["dx", "partial"]),
    ("ce_forward", ["loss", "lse_out", "nll"]), ("ce_backward", ["dz"]),
    ("dropout_mask", ["out"]), ("norm_forward", ["mean_out", "rstd_out", "y"]),
    ("norm_backward", ["dbranch", "dx", "partial_b", "partial_bb", "partial_w"]),
])
def test_kernel_writes_only_its_outputs(analysis: dict[str, dict], kernel: str,
                                        outputs: list[str]) -> None:
    assert analysis["writes"][kernel] == outputs


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_compiles_with_float64_scalars(analysis: dict[str, dict], kernel: str) -> None:
    """Compiled with dynamic shapes, Inductor may pass a Python float argument (dropout's
    1 / (1 - p), label smoothing) as float64: the kernel must still compile (a loop-carried
    float32 sum turned float64 did not, on the H200 in session 11) and keep float32 math."""
    assert analysis["fp64"][kernel] is None
