"""Build/runtime facts: ``python -m slimformer.info``, the torch version the extension was built
against, and the ImportError (with rebuild instructions) on a torch minor-version mismatch."""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import slimformer
from slimformer import _C, _build_info


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_info_module_runs_and_prints_torch_version():
    proc = subprocess.run([sys.executable, "-m", "slimformer.info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert torch.__version__ in out
    assert _build_info.TORCH_VERSION in out
    assert slimformer.__version__ in out
    for key in ("torch (built against)", "torch (running)", "cpu kernels compiled", "cpu kernel in use",
                "cuda kernels compiled"):
        assert key in out, key


def test_build_info_dict():
    from slimformer.info import build_info

    info = build_info()
    assert info["torch (running)"] == torch.__version__
    assert info["cpu kernel in use"] in ("scalar", "avx2", "avxvnni", "avx512vnni")
    assert "scalar" in info["cpu kernels compiled"]
    assert info["cuda available"] == torch.cuda.is_available()


def test_built_torch_version_matches_running_torch():
    assert _major_minor(_C.built_torch_version) == _major_minor(torch.__version__)
    assert _major_minor(_build_info.TORCH_VERSION) == _major_minor(torch.__version__)
    assert _C.built_torch_version.split("+")[0] == _build_info.TORCH_VERSION.split("+")[0]


def test_compiled_facts():
    assert "scalar" in _C.compiled_cpu_isas
    assert isinstance(_C.has_cuda_kernels, bool)
    assert _C.has_cuda_kernels == _build_info.WITH_CUDA
    assert isinstance(_C.cuda_archs, str)
    assert _C.__version__ == slimformer.__version__


@pytest.mark.parametrize("built", ["1.0.0", "2.99.0", "3.13.0"])
def test_check_torch_matches_build_rejects_other_minor(built, monkeypatch):
    monkeypatch.setattr(_build_info, "TORCH_VERSION", built)
    with pytest.raises(ImportError) as info:
        slimformer._check_torch_matches_build()
    msg = str(info.value)
    assert f"built against torch {built}" in msg
    assert torch.__version__ in msg
    assert "pip install --no-build-isolation" in msg  # how to rebuild


def test_check_torch_matches_build_ignores_patch_and_local_version(monkeypatch):
    major, minor = _major_minor(torch.__version__)
    monkeypatch.setattr(_build_info, "TORCH_VERSION", f"{major}.{minor}.99")
    slimformer._check_torch_matches_build()
    monkeypatch.setattr(torch, "__version__", f"{major}.{minor}.7+cu999")
    slimformer._check_torch_matches_build()


def test_check_torch_matches_build_running_torch_differs(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "9.9.1+cpu")
    with pytest.raises(ImportError, match=r"torch 9\.9\.1\+cpu is installed.*Rebuild with"):
        slimformer._check_torch_matches_build()


def test_check_torch_matches_build_without_build_info(monkeypatch):
    """A source tree without a build gives an ImportError saying how to build."""
    monkeypatch.delattr(slimformer, "_build_info")
    monkeypatch.setitem(sys.modules, "slimformer._build_info", None)
    with pytest.raises(ImportError, match=r"compiled extension is missing.*pip install --no-build-isolation"):
        slimformer._check_torch_matches_build()


def test_reload_with_mismatched_build_raises(monkeypatch):
    """Reloading the package with another recorded torch version fails at import time."""
    monkeypatch.setattr(_build_info, "TORCH_VERSION", "1.0.0")
    try:
        with pytest.raises(ImportError, match="Rebuild with `pip install --no-build-isolation"):
            importlib.reload(slimformer)
    finally:
        monkeypatch.undo()
        importlib.reload(slimformer)  # leave a fully initialised package behind
    assert slimformer._check_torch_matches_build() is None


def test_import_in_fresh_process_with_other_torch_version():
    """A real import in a new interpreter whose torch reports another minor version."""
    proc = _run_python("""
        import torch
        torch.__version__ = "1.0.0+cpu"
        try:
            import slimformer
        except ImportError as e:
            print("IMPORTERROR:", e)
        else:
            print("IMPORTED")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTERROR:" in proc.stdout, proc.stdout
    assert "torch 1.0.0+cpu is installed" in proc.stdout
    assert "pip install --no-build-isolation" in proc.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="ELF dynamic section")
def test_extension_uses_torchs_shared_libstdcxx():
    # A private static copy of libstdc++ inside _C (some GCC 13 toolchains link one) segfaults on
    # the first TORCH_CHECK message that formats a number; CMakeLists.txt links the shared one.
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    out = subprocess.run([readelf, "-d", "-W", _C.__file__], capture_output=True, text=True, timeout=60).stdout
    assert "libstdc++.so" in out, f"{_C.__file__} does not load the shared libstdc++:\n{out}"


def test_error_messages_with_numbers_do_not_crash():
    # The symptom of a static libstdc++ copy (see above), in a child process so a crash fails a test.
    proc = _run_python("""
        import torch, slimformer
        q = torch.zeros(32, 8, dtype=torch.int32)
        try:
            torch.ops.slimformer.gptq_dequantize(q, torch.zeros(2, 1, dtype=torch.int32),
                                                torch.ones(2, 8).half(), torch.zeros(256, dtype=torch.int32), 5, 1)
        except ValueError as e:
            print("raised", "bits=5" in str(e))
    """)
    assert proc.returncode == 0 and "raised True" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr)
