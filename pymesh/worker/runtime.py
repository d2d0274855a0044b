"""The compute side of a worker: a span of blocks (or the echo stand-in) and its thread.

Model compute never runs on the event loop: :meth:`Runtime.run` hands a function to
``trio.to_thread.run_sync`` under a FIFO lock, so one forward pass runs at a time
per device while the node keeps answering the DHT, pings and other RPCs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

import trio

if TYPE_CHECKING:
    import torch

    from pymesh.model.kv_cache import KVCache
    from pymesh.model.span import SpanModel

log = logging.getLogger(__name__)
T = TypeVar("T")


class EchoSpan:
    """Echo mode: serves ``[start, stop)`` without weights and returns its input."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def new_cache(self, max_tokens: int, batch: int = 1) -> None:
        return None

    def cache_bytes_per_token(self) -> int:
        return 0

    def forward(self, hidden: "torch.Tensor", cache: "KVCache | None", start_pos: int) -> "torch.Tensor":
        return hidden


@dataclass
class Throughput:
    block_ms: float
    tokens_per_s: float


class Runtime:
    """A loaded span plus the lock that serialises compute on its device."""

    def __init__(self, span: "SpanModel | EchoSpan", *, device: str = "cpu", dtype_name: str = "float32") -> None:
        self.span = span
        self.device = device
        self.dtype_name = dtype_name
        #: the device: one forward at a time, FIFO (held by :meth:`run` and the batcher)
        self.device_lock = trio.Lock()
        self.echo = isinstance(span, EchoSpan)
        from pymesh.worker.batcher import StepBatcher

        #: steps go through here: those of different sessions that are ready together run batched
        self.batcher = StepBatcher(self)

    @property
    def start(self) -> int:
        return int(self.span.start)

    @property
    def stop(self) -> int:
        return int(self.span.stop)

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the device's compute thread (one at a time, in arrival order)."""
        if self.echo:
            return fn()
        async with self.device_lock:
            return await trio.to_thread.run_sync(fn)

    def new_cache(self, max_tokens: int, batch: int) -> "KVCache | None":
        return self.span.new_cache(max_tokens, batch)

    def forward(self, hidden: "torch.Tensor", cache: "KVCache | None", start_pos: int) -> "torch.Tensor":
        if isinstance(self.span, EchoSpan):
            return hidden
        if cache is None:
            raise ValueError("a loaded span needs the cache its new_cache made")
        import torch

        with torch.inference_mode():
            x = hidden.to(device=self.span.device, dtype=self.span.dtype)
            out = self.span.forward(x, cache, start_pos)
            # hidden states travel in the dtype they came in (the client's): a bf16 worker in an
            # fp32 swarm computes in bf16 and answers in fp32, as the next hop and client expect
            return out.to(device="cpu", dtype=hidden.dtype).contiguous()

    def forward_ragged(self, items: "list[tuple[torch.Tensor, KVCache, int]]") -> "list[torch.Tensor]":
        """Several sessions' steps (``[1, seq, hidden]`` each, own cache and position) as one
        forward (:mod:`pymesh.model.ragged`); each output in its input's dtype, on the CPU."""
        if isinstance(self.span, EchoSpan):
            return [x for x, _, _ in items]
        import torch

        from pymesh.model.ragged import forward_ragged

        span = self.span
        with torch.inference_mode():
            outs = forward_ragged(span, [(x.to(device=span.device, dtype=span.dtype), c, p) for x, c, p in items])
            # outputs are views of one buffer: each gets its own
            return [y.to(device="cpu", dtype=x.dtype).clone() for y, (x, _, _) in zip(outs, items)]

    def measure_throughput(self, steps: int = 8, *, announced: float | None = None,
                           skip: bool = False) -> Throughput:
        """Time decode steps (one token, growing cache) on this span; runs in the caller's thread.

        ``announced`` (PYMESH_THROUGHPUT) replaces the measurement; ``skip``
        (PYMESH_SKIP_THROUGHPUT) announces a nominal figure instead.
        """
        n_blocks = max(self.stop - self.start, 1)
        if announced is not None:
            return Throughput(1000.0 / announced / n_blocks, announced)
        if isinstance(self.span, EchoSpan) or skip:
            return Throughput(1.0, 1000.0 / n_blocks)
        import torch

        hidden_size = self.span.config.hidden_size
        cache = self.span.new_cache(steps + 2, 1)
        x = torch.randn(1, 1, hidden_size, generator=torch.Generator().manual_seed(0))
        self.forward(x, cache, 0)  # warm-up
        t0 = time.perf_counter()
        for i in range(steps):
            self.forward(x, cache, i + 1)
        per_step = (time.perf_counter() - t0) / steps
        return Throughput(per_step * 1000.0 / n_blocks, 1.0 / max(per_step, 1e-9))


def load_runtime(
    model_path: str | None,
    start: int,
    stop: int,
    *,
    device: str,
    dtype_name: str,
    progress: bool = False,
    quantize: str | None = None,
) -> Runtime:
    """Load blocks ``[start, stop)`` from ``model_path`` (or echo mode without one);
    ``quantize``: their weight matrices in that block format (``--quantize``)."""
    if model_path is None:
        return Runtime(EchoSpan(start, stop), device=device, dtype_name=dtype_name)
    from pymesh.model.span import load_span
    from pymesh.model.torch_setup import parse_dtype

    t0 = time.perf_counter()
    span = load_span(Path(model_path), start, stop, device=device, dtype=parse_dtype(dtype_name),
                     progress=progress, quantize=quantize)
    log.info("loaded blocks %d-%d from %s in %.1f s", start, stop - 1, model_path, time.perf_counter() - t0)
    return Runtime(span, device=device, dtype_name=dtype_name)


def block_bytes(model_path: str, dtype_name: str, quantize: str | None = None) -> tuple[int, int, int]:
    """(bytes per block, KV-cache bytes per token per block, number of blocks) from config.json.

    Weight matrices count at their block format's bytes per weight when they are computed
    quantized (``quantize`` for a folder, the file's own format for a GGUF model:
    :func:`pymesh.model.fingerprint.quant_label`), norms and biases in the run dtype."""
    from pymesh.model.config import load_config
    from pymesh.model.fingerprint import quant_label
    from pymesh.model.quant import qformat
    from pymesh.model.torch_setup import parse_dtype
    from pymesh.worker.placement import block_parameter_count, block_vector_count, block_weight_bytes

    cfg = load_config(Path(model_path))
    elem = 4 if parse_dtype(dtype_name).itemsize == 4 else 2
    label = quant_label(model_path, quantize)
    heads = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    params = block_parameter_count(cfg.hidden_size, cfg.intermediate_size, *heads, cfg.attention_bias)
    per_block = block_weight_bytes(params, block_vector_count(cfg.hidden_size, *heads, cfg.attention_bias),
                                   elem_bytes=elem,
                                   quant_block_bytes=None if label is None else qformat(label).block_bytes)
    kv = 2 * cfg.num_key_value_heads * cfg.head_dim * elem
    return per_block, kv, cfg.num_hidden_layers
