"""``python -m slimformer.info``: what this slimformer build contains and what this machine runs."""
from __future__ import annotations

import platform

import torch


def build_info() -> dict:
    import slimformer
    from slimformer import _C, _build_info

    return {
        "slimformer": slimformer.__version__,
        "torch (built against)": _build_info.TORCH_VERSION,
        "torch (running)": torch.__version__,
        "python": platform.python_version(),
        "cpu kernels compiled": ", ".join(_C.compiled_cpu_isas),
        "cpu supports avx2+fma+f16c": _C.cpu_supports_avx2(),
        "cpu supports avx-vnni": _C.cpu_supports_avxvnni(),
        "cpu supports avx-512 vnni": _C.cpu_supports_avx512vnni(),
        "cpu supports avx-512 popcnt": _C.cpu_supports_avx512vpopcntdq(),
        "cpu kernel in use": _C.active_cpu_isa(),
        "cuda kernels compiled": bool(_C.has_cuda_kernels),
        "cuda archs": _C.cuda_archs or "-",
        "cuda available": torch.cuda.is_available(),
        "cuda device": torch.cuda.get_device_name() if torch.cuda.is_available() else "-",
        "torch threads": torch.get_num_threads(),
    }


def main() -> None:
    info = build_info()
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
