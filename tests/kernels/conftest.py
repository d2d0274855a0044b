"""Shared helpers of the kernel tests: tolerances, seeded random tensors."""

from __future__ import annotations

import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOKENS = [1, 7, 83, 512]
HIDDEN = [64, 576, 769, 4096, 5125]

# (rtol, atol) per dtype: float32 differs only by summation order; the half
# types may differ by an ulp where the float32 intermediate rounds differently.
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                 scale: float = 1.0) -> None:
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol * scale)


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)


@pytest.fixture(autouse=True)
def _two_threads():  # type: ignore[no-untyped-def]
    """Kernels split work by torch's thread count; pin it so runs are repeatable."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
