"""Smoke test of an installed slimformer wheel (used by .ci/run; no GPU needed)."""
import importlib.metadata

import torch

import slimformer
from slimformer import _C
from slimformer.nn import BinaryLinear, QuantLinear

requires = importlib.metadata.requires("slimformer") or []
torch_pin = [r for r in requires if r.startswith("torch")]
minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
assert torch_pin == [f"torch=={minor}.*"], f"wheel must pin torch {minor}.*, has {torch_pin}"
assert _C.has_cuda_kernels, "wheel was built without CUDA kernels"
for op in ("gptq_gemm", "gptq_dequantize", "binary_gemm", "binary_gemm_a1"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"slimformer::{op}", key), f"{op} lacks {key}"
lin = torch.nn.Linear(576, 1536)
q = QuantLinear.from_linear(lin, bits=4, group_size=128)
x = torch.randn(3, 576)
err = (q(x) - lin(x)).norm() / lin(x).norm()
assert err < 0.2, f"4-bit output too far from fp32: {err}"
b = BinaryLinear.from_linear(lin)
torch.testing.assert_close(b(x), x @ b.dequantized_weight().t() + lin.bias, rtol=1e-4, atol=1e-4)
print(f"wheel OK: slimformer {slimformer.__version__}, torch {torch.__version__}, pin {torch_pin[0]}, "
      f"cuda archs {_C.cuda_archs}, rel err vs fp32 {err:.3f}")
