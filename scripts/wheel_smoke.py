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
for op in ("gptq_gemm", "gptq_dequantize", "binary_gemm", "binary_gemm_a1", "sparse_attention_fwd",
           "sparse_attention_bwd", "tome_match", "tome_merge"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"slimformer::{op}", key), f"{op} lacks {key}"
lin = torch.nn.Linear(576, 1536)
q = QuantLinear.from_linear(lin, bits=4, group_size=128)
x = torch.randn(3, 576)
err = (q(x) - lin(x)).norm() / lin(x).norm()
assert err < 0.2, f"4-bit output too far from fp32: {err}"
b = BinaryLinear.from_linear(lin)
torch.testing.assert_close(b(x), x @ b.dequantized_weight().t() + lin.bias, rtol=1e-4, atol=1e-4)
from slimformer.attention import SlidingWindow  # noqa: E402
from slimformer.attention.reference import sparse_attention_reference  # noqa: E402
from slimformer.ops.attention import sparse_attention  # noqa: E402

sq, sk = torch.randn(1, 2, 70, 64), torch.randn(1, 1, 70, 64)
pat = SlidingWindow(16, global_tokens=(0,))
s_out = sparse_attention(sq, sk, sk, pat.plan(70, num_heads=2))
s_ref, _ = sparse_attention_reference(sq, sk, sk, pat.dense_mask(70, num_heads=2))
torch.testing.assert_close(s_out.double(), s_ref, rtol=1e-4, atol=1e-4)
print(f"wheel OK: slimformer {slimformer.__version__}, torch {torch.__version__}, pin {torch_pin[0]}, "
      f"cuda archs {_C.cuda_archs}, rel err vs fp32 {err:.3f}")
