"""The decode GEMV kernel (linear) against a float64 product and torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pymesh.model import ops
from tests.kernels.conftest import DTYPES, assert_close, randn

pytestmark = pytest.mark.timeout(60)

SHAPES = [(576, 576), (769, 1001), (64, 5125), (4096, 35), (17, 3), (1536, 576)]


def exact(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


def check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """Within float32 summation error of the exact product, plus one rounding to the dtype."""
    ref = exact(x, w, b)
    k = w.shape[1]
    scale = (x.double().abs() @ w.double().abs().T).max().item()
    rounding = {torch.float32: 0.0, torch.float16: 2**-11, torch.bfloat16: 2**-8}[y.dtype]
    err = (y.double() - ref).abs()
    bound = ref.abs() * rounding * 1.01 + scale * 4e-7 * k ** 0.5 + 1e-6
    assert (err <= bound).all(), f"max error {err.max().item()} > bound"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("rows", range(1, 9))
def test_linear_matches_exact(rows: int, k: int, n: int, dtype: torch.dtype) -> None:
    x = randn(rows, k, dtype=dtype, seed=rows)
    w = randn(n, k, dtype=dtype, seed=k + n)
    b = randn(n, dtype=dtype, seed=3) if rows % 2 else None
    before = ops.kernel_stats()["linear"]
    y = ops.linear(x, w, b)
    assert ops.kernel_stats()["linear"] == before + 1, "the GEMV kernel was not used"
    assert y.shape == (rows, n) and y.dtype == dtype
    check(y, x, w, b)


def test_the_kernel_takes_up_to_32_rows() -> None:
    """Batched decode steps of up to 32 sessions stay on the kernel (decode_plan checks this)."""
    assert ops.LINEAR_MAX_ROWS == 32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,n", [(576, 576), (769, 1001), (17, 3), (2048, 99), (35, 4096)])
def test_linear_every_row_count_up_to_the_max(k: int, n: int, dtype: torch.dtype) -> None:
    """Every row count 1..32 (the tiled path above 8 rows: tiles of unequal size, blocks of
    weight rows cut short at the end), with and without bias, x row-strided (a slice of a
    wider tensor) on odd counts."""
    w = randn(n, k, dtype=dtype, seed=k + n)
    b = randn(n, dtype=dtype, seed=3)
    wide = randn(ops.LINEAR_MAX_ROWS, k + 7, dtype=dtype, seed=k)
    for rows in range(1, ops.LINEAR_MAX_ROWS + 1):
        x = wide[:rows, 3:k + 3] if rows % 2 else wide[:rows, :k].contiguous()
        bias = b if rows % 3 else None
        before = ops.kernel_stats()["linear"]
        y = ops.linear(x, w, bias)
        assert ops.kernel_stats()["linear"] == before + 1, f"{rows} rows: the kernel was not used"
        assert y.shape == (rows, n) and y.dtype == dtype
        check(y, x, w, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_many_rows_close_to_torch(dtype: torch.dtype) -> None:
    """Against torch.nn.functional.linear with the kernel tests' tolerances, 9..32 rows."""
    w = randn(1001, 769, dtype=dtype, seed=21)
    b = randn(1001, dtype=dtype, seed=22)
    for rows in (9, 16, 17, 31, 32):
        x = randn(rows, 769, dtype=dtype, seed=rows)
        assert_close(ops.linear(x, w, b), F.linear(x.float(), w.float(), b.float()), dtype,
                     scale=10.0)


@pytest.fixture(params=["avx512", "generic"])
def lower_isa(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Cap the GEMV code path so the paths this CPU would not pick are tested too."""
    c = ops._C
    assert c is not None
    c.linear_limit_isa(request.param)
    yield request.param
    c.linear_limit_isa("avx512+avx512_bf16")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,n", [(769, 1001), (17, 3), (64, 5125)])
@pytest.mark.parametrize("rows", [1, 5, 8, 9, 23, 32])
def test_linear_other_code_paths(rows: int, k: int, n: int, dtype: torch.dtype,
                                 lower_isa: str) -> None:
    x = randn(rows, k, dtype=dtype, seed=rows)
    w = randn(n, k, dtype=dtype, seed=k + n)
    b = randn(n, dtype=dtype, seed=3) if rows % 2 else None
    check(ops.linear(x, w, b), x, w, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_3d_strided_x_and_one_thread(dtype: torch.dtype) -> None:
    big = randn(1, 5, 900, dtype=dtype, seed=4)
    x = big[..., 100:869]
    w = randn(1001, 769, dtype=dtype, seed=5)
    y = ops.linear(x, w)
    assert y.shape == (1, 5, 1001)
    check(y.reshape(5, 1001), x.reshape(5, 769), w, None)
    torch.set_num_threads(1)
    assert torch.equal(ops.linear(x, w), y), "the result must not depend on the thread count"


def test_linear_falls_back_to_torch_outside_the_kernel_cases() -> None:
    w = randn(64, 32, seed=6)
    before = ops.kernel_stats()["linear"]
    x = randn(ops.LINEAR_MAX_ROWS + 1, 32, seed=7)  # more rows than the GEMV kernel takes
    torch.testing.assert_close(ops.linear(x, w), F.linear(x, w))
    w_t = randn(32, 64, seed=8).t()  # a non-contiguous weight
    torch.testing.assert_close(ops.linear(x[:2], w_t), F.linear(x[:2], w_t))
    xi = torch.ones(2, 32, dtype=torch.float64)  # a dtype the kernel lacks
    torch.testing.assert_close(ops.linear(xi, w.double()), F.linear(xi, w.double()))
    assert ops.kernel_stats()["linear"] == before


def test_linear_close_to_torch_linear_bf16() -> None:
    x = randn(4, 4096, dtype=torch.bfloat16, seed=8)
    w = randn(512, 4096, dtype=torch.bfloat16, seed=9)
    torch.testing.assert_close(ops.linear(x, w).float(), F.linear(x, w).float(),
                               rtol=1.6e-2, atol=0.3)


def test_read_sum_streams_every_element() -> None:
    """The bandwidth probe of the benchmark sums what it reads (odd length, both thread counts)."""
    data = randn(3 * (1 << 20) + 7, seed=10)
    expected = data.double().sum().item()
    for threads in (1, 2):
        assert ops._C is not None
        assert ops._C.read_sum(data.data_ptr(), data.numel(), threads) == pytest.approx(expected, abs=1e-1)


def test_concurrent_callers_share_the_pool_correctly() -> None:
    """Python threads calling kernels at once (the GIL is released): every result exact."""
    import threading

    w = randn(2048, 1024, seed=11)  # 8 MiB: each call asks for helper threads
    xs = [randn(r, 1024, seed=20 + r) for r in (1, 3, 8, 2, 32, 13)]
    expected = [ops.linear(x, w) for x in xs]
    errors: list[str] = []

    def worker(i: int) -> None:
        for _ in range(15):
            y = ops.linear(xs[i], w)
            if not torch.equal(y, expected[i]):
                errors.append(f"thread {i}: max diff {(y - expected[i]).abs().max().item()}")
                return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork (POSIX)")
def test_a_forked_child_still_runs_the_kernels() -> None:
    """After fork the child has no helper threads: its pool starts afresh, no deadlock."""
    import os

    w = randn(2048, 1024, seed=12)
    x = randn(2, 1024, seed=13)
    expected = ops.linear(x, w)  # starts the parent's helpers
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        ok = torch.equal(ops.linear(x, w), expected)
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_sized_gemvs_split_over_two_threads_equal_one_thread(dtype: torch.dtype) -> None:
    """Back-to-back small GEMVs (a decode step's shapes) handed to a spinning helper: each output
    row is computed by one thread either way, so two threads give exactly the one-thread bytes."""
    assert ops._C is not None
    shapes = [(576, 576), (384, 576), (3072, 576), (576, 1536), (1000, 576)]
    ws = [randn(n, k, seed=30 + i).to(dtype) for i, (n, k) in enumerate(shapes)]
    xs = {k: randn(1, k, seed=40 + k).to(dtype) for k in (576, 1536)}
    code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]

    def run(w: torch.Tensor, threads: int) -> torch.Tensor:
        n, k = w.shape
        y = torch.full((1, n), float("nan"), dtype=dtype)
        ops._C.linear(y.data_ptr(), xs[k].data_ptr(), k, w.data_ptr(), 0, 1, k, n, code, threads)
        return y

    expected = [run(w, 1) for w in ws]
    for e, w in zip(expected, ws):
        check(e, xs[w.shape[1]], w, None)
    for _ in range(40):
        for e, w in zip(expected, ws):
            assert torch.equal(run(w, 2), e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_back_to_back_jobs_of_every_size_equal_one_thread(dtype: torch.dtype) -> None:
    """Many pool jobs in a row, each a different chunk count and row count (the pool's claim
    word turns over every call; helpers that wake late must not take a chunk of the next job
    twice or skip one): two threads give exactly the one-thread bytes every time."""
    assert ops._C is not None
    code = {torch.float32: 0, torch.bfloat16: 2}[dtype]
    ws = [randn(n, 576, dtype=dtype, seed=50 + n) for n in (192, 576, 1536, 3072)]
    xs = randn(ops.LINEAR_MAX_ROWS, 576, dtype=dtype, seed=51)

    def run(w: torch.Tensor, rows: int, threads: int) -> torch.Tensor:
        y = torch.full((rows, w.shape[0]), float("nan"), dtype=dtype)
        ops._C.linear(y.data_ptr(), xs.data_ptr(), 576, w.data_ptr(), 0, rows, 576, w.shape[0],
                      code, threads)
        return y

    cases = [(w, rows) for rows in (1, 3, 8, 9, 32) for w in ws]
    expected = [run(w, rows, 1) for w, rows in cases]
    for _ in range(10):
        for e, (w, rows) in zip(expected, cases):
            assert torch.equal(run(w, rows, 2), e), f"{rows} x {tuple(w.shape)}"
