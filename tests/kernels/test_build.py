"""The built extension: loads anywhere, never depends on the CUDA runtime or libtorch."""

from __future__ import annotations

import glob
import os
import shutil
import struct
import subprocess
import sys

import pytest

from pymesh import _C

pytestmark = pytest.mark.timeout(60)

FORBIDDEN = ("libcudart", "libcuda.", "libtorch", "libc10")


def elf_needed(path: str) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF file (its .dynamic section)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path}: not ELF64 LE"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    needed = []
    for _name, kind, _flags, _addr, offset, size, link, _info, _align, _entsize in sections:
        if kind != 6:  # SHT_DYNAMIC
            continue
        strtab_offset = sections[link][4]
        for pos in range(offset, offset + size, 16):
            tag, val = struct.unpack_from("<qQ", data, pos)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                end = data.index(b"\0", strtab_offset + val)
                needed.append(data[strtab_offset + val:end].decode())
    return needed


def test_module_needs_no_cuda_runtime_and_no_libtorch() -> None:
    needed = elf_needed(_C.__file__)
    assert any(name.startswith("libc.so") for name in needed), needed  # the parser works
    bad = [name for name in needed if name.startswith(FORBIDDEN)]
    assert not bad, f"{_C.__file__} links {bad}: it must load on machines without CUDA/torch"


@pytest.mark.skipif(shutil.which("ldd") is None, reason="ldd is not installed")
def test_ldd_resolves_everything_without_cuda() -> None:
    out = subprocess.run(["ldd", _C.__file__], capture_output=True, text=True, timeout=30).stdout
    assert "not found" not in out, out
    assert not any(lib in out for lib in FORBIDDEN), out


def test_imports_in_a_clean_process_without_gpus() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    code = "import pymesh._C as c; print(c.has_cuda, c.linear_isa())"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr


def test_cuda_kernels_compiled_when_nvcc_exists() -> None:
    nvcc = glob.glob("/usr/local/cuda*/bin/nvcc") or ([shutil.which("nvcc")] if shutil.which("nvcc") else [])
    if not nvcc:
        pytest.skip("no nvcc on this machine: the CPU-only build is expected")
    if os.environ.get("PYMESH_CUDA", "").upper() == "OFF":
        pytest.skip("PYMESH_CUDA=OFF was requested for this build")
    assert _C.has_cuda, (f"{nvcc[0]} exists but pymesh._C was built without CUDA kernels; "
                         "rebuild with `pip install -e . --no-deps` and read CMake's output")
    assert {"rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul"} <= set(dir(_C.cuda))


def test_cpu_kernels_report_their_isa_and_use_helper_threads() -> None:
    import torch

    assert _C.linear_isa() in ("avx512+avx512_bf16", "avx512", "generic")
    w = torch.randn(2048, 1024)  # 8 MiB: worth two threads
    x = torch.randn(1, 1024)
    y = torch.empty(1, 2048)
    _C.linear(y.data_ptr(), x.data_ptr(), 1024, w.data_ptr(), 0, 1, 1024, 2048, 0, 2)
    assert _C.pool_size() >= 1, "a two-thread call started no helper thread"
    torch.testing.assert_close(y, x @ w.T, rtol=1e-4, atol=1e-3)
