"""decode_attention (a ragged batch of one-token steps, each over its own KV cache) against torch."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from pymesh.model import ops
from pymesh.model.kv_cache import KVCache
from tests.kernels.conftest import DTYPES, TOLERANCE, randn

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not ops.using_c(), reason="pymesh._C is not built: nothing to test")]

CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _reference(qkv: torch.Tensor, caches: list[KVCache], positions: list[int], block: int, heads: int,
               kv_heads: int, d: int, window: int) -> torch.Tensor:
    """torch: store each row's k/v in its cache (copied), then SDPA per row in float32."""
    out = []
    for r, (cache, pos) in enumerate(zip(caches, positions)):
        keys = cache.keys[block][0].clone().float()      # [kv_heads, max_tokens, d]
        values = cache.values[block][0].clone().float()
        row = qkv[r].float()
        keys[:, pos] = row[heads * d:(heads + kv_heads) * d].view(kv_heads, d)
        values[:, pos] = row[(heads + kv_heads) * d:].view(kv_heads, d)
        lo = max(0, pos + 1 - window) if window else 0
        q = row[:heads * d].view(kv_heads, heads // kv_heads, d)
        o = F.scaled_dot_product_attention(q, keys[:, lo:pos + 1], values[:, lo:pos + 1])
        out.append(o.reshape(heads * d))
    return torch.stack(out)


@pytest.fixture(params=["avx512", "avx2", "generic"])
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each code path the CPU has (attention_limit_isa caps the one decode_attention picks)."""
    name: str = request.param
    ops._C.attention_limit_isa(name)
    try:
        if ops._C.attention_isa() != name:
            pytest.skip(f"this CPU has no {name} path (it runs {ops._C.attention_isa()})")
        yield name
    finally:
        ops._C.attention_limit_isa("avx512")


# head_dim 64 / 128 / 80 / 96: whole AVX-512 vectors (80 and 96 leave a column chunk of 1 / 2
# vectors); 33: not a whole vector, the portable loops on every path. Groups of 3, 1, 6, 2, 8.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim",
                         [(9, 3, 64), (8, 8, 80), (12, 2, 33), (6, 1, 128), (4, 2, 96), (16, 2, 64)])
@pytest.mark.parametrize("window", [0, 5, 37])
def test_decode_attention_matches_torch(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                                        window: int, isa: str) -> None:
    d = head_dim
    blocks, block = 3, 1
    positions = [0, 4, 17, 63, 1, 150, 9]
    sizes = [8, 16, 64, 64, 2, 200, 10]       # each row's own cache length
    caches = []
    for r, n in enumerate(sizes):
        c = KVCache(blocks, 1, kv_heads, n, d, dtype=dtype)
        c._kv.copy_(randn(*c._kv.shape, seed=r + 1).to(dtype))
        caches.append(c)
    rows = len(positions)
    qkv = randn(rows, (heads + 2 * kv_heads) * d, seed=99, dtype=dtype)
    want = _reference(qkv, caches, positions, block, heads, kv_heads, d, window)
    out = torch.full((rows, heads * d), float("nan"), dtype=dtype)
    ptrs = torch.tensor([c.slot_ptrs[block] for c in caches], dtype=torch.int64)
    pos = torch.tensor(positions, dtype=torch.int64)
    limits = torch.tensor(sizes, dtype=torch.int64)
    ops._C.decode_attention(out.data_ptr(), heads * d, qkv.data_ptr(), qkv.shape[1], ptrs.data_ptr(),
                            pos.data_ptr(), limits.data_ptr(), rows, heads, kv_heads, d, window,
                            1.0 / math.sqrt(d), CODES[dtype], 2)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), want, rtol=rtol, atol=atol)
    # the new keys and values are in each row's cache, at its position, in block 1 only
    for r, (c, p) in enumerate(zip(caches, positions)):
        k_new = qkv[r, heads * d:(heads + kv_heads) * d].view(kv_heads, d)
        assert torch.equal(c.keys[block][0, :, p], k_new)
        assert torch.equal(c.values[block][0, :, p], qkv[r, (heads + kv_heads) * d:].view(kv_heads, d))


def test_decode_attention_refuses_a_position_outside_its_cache() -> None:
    c = KVCache(1, 1, 2, 4, 8, dtype=torch.float32)
    qkv = torch.zeros(1, 6 * 8)
    out = torch.zeros(1, 2 * 8)
    ptrs = c.slot_ptrs[:1].clone()
    limits = torch.tensor([4], dtype=torch.int64)
    with pytest.raises(ValueError, match="outside its cache of 4 positions"):
        ops._C.decode_attention(out.data_ptr(), 16, qkv.data_ptr(), 48, ptrs.data_ptr(),
                                torch.tensor([4]).data_ptr(), limits.data_ptr(), 1, 2, 2, 8, 0, 0.3, 0, 1)
    with pytest.raises(ValueError, match="kv_heads dividing heads"):
        ops._C.decode_attention(out.data_ptr(), 16, qkv.data_ptr(), 48, ptrs.data_ptr(),
                                torch.tensor([0]).data_ptr(), limits.data_ptr(), 1, 3, 2, 8, 0, 0.3, 0, 1)
