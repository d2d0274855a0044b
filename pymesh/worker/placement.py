"""Automatic block placement: how many blocks fit, and which ones to serve. Pure.

The swarm's capacity for a block is the sum of the announced throughputs of the
workers serving it; the swarm as a whole runs at the speed of its weakest block
(the bottleneck). A joining worker takes the window of blocks that helps most:
first the one covering the most blocks nobody serves (close gaps), then the one
whose weakest block is weakest, then the one with the lowest total throughput.
A running worker moves when moving would raise the bottleneck by a clear margin
(Petals' rule, with our own numbers), or when blocks are left without any worker, and
never when leaving would uncover blocks only it serves. Records can be forged or hidden,
so a move also needs :class:`MoveGuard`'s hysteresis: the same move proposed by
consecutive checks, and a cooldown after each move (fake gaps cannot make a worker hop
every period, dropping its sessions each time).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

#: move only if the swarm's bottleneck improves by at least this factor
DEFAULT_MOVE_MARGIN = 1.25


@dataclass(frozen=True)
class Announced:
    """What placement needs from one worker record."""

    start: int
    stop: int
    tokens_per_s: float


def block_throughputs(num_blocks: int, records: Sequence[Announced]) -> list[float]:
    """Per block, the summed throughput of the workers serving it (0 = uncovered)."""
    total = [0.0] * num_blocks
    for r in records:
        weight = r.tokens_per_s if r.tokens_per_s > 0 else 1.0
        for b in range(max(r.start, 0), min(r.stop, num_blocks)):
            total[b] += weight
    return total


def _window_key(window: Sequence[float]) -> tuple[int, float, float]:
    uncovered = sum(1 for t in window if t <= 0.0)
    return (-uncovered, min(window), sum(window))


def choose_start(num_blocks: int, length: int, records: Sequence[Announced]) -> int:
    """Start of the best window of ``length`` blocks given the other workers' records."""
    if not 0 < length <= num_blocks:
        raise ValueError(f"cannot place {length} blocks in a model of {num_blocks}")
    tput = block_throughputs(num_blocks, records)
    best = min(range(num_blocks - length + 1), key=lambda s: (_window_key(tput[s:s + length]), s))
    return best


def bottleneck(num_blocks: int, records: Sequence[Announced]) -> float:
    tput = block_throughputs(num_blocks, records)
    return min(tput) if tput else 0.0


@dataclass(frozen=True)
class MoveDecision:
    move: bool
    new_start: int
    reason: str


def should_move(
    num_blocks: int,
    mine: Announced,
    others: Sequence[Announced],
    *,
    margin: float = DEFAULT_MOVE_MARGIN,
) -> MoveDecision:
    """Whether a worker serving ``mine`` should move, and where to.

    ``others`` are the other live workers' records (not this one's). A move happens
    when blocks would otherwise stay uncovered and moving covers more of them, or
    when it raises the bottleneck by ``margin``.
    """
    length = mine.stop - mine.start
    new_start = choose_start(num_blocks, length, others)
    if new_start == mine.start:
        return MoveDecision(False, mine.start, "already at the best position")
    moved = Announced(new_start, new_start + length, mine.tokens_per_s)
    now_tput = block_throughputs(num_blocks, [*others, mine])
    new_tput = block_throughputs(num_blocks, [*others, moved])
    now_gaps = sum(1 for t in now_tput if t <= 0)
    new_gaps = sum(1 for t in new_tput if t <= 0)
    if any(t <= 0 for t in new_tput[mine.start:mine.stop]):
        return MoveDecision(False, mine.start, "moving would uncover blocks only this worker serves")
    if new_gaps < now_gaps:
        return MoveDecision(True, new_start, f"covers {now_gaps - new_gaps} block(s) nobody serves")
    if new_gaps > now_gaps:
        return MoveDecision(False, mine.start, "moving would uncover blocks")
    now_b, new_b = min(now_tput), min(new_tput)
    if now_b > 0 and new_b >= now_b * margin:
        return MoveDecision(True, new_start, f"raises the bottleneck from {now_b:.1f} to {new_b:.1f} tok/s")
    return MoveDecision(False, mine.start, "the swarm is balanced enough")


@dataclass
class MoveGuard:
    """Hysteresis over :func:`should_move`: act on a move only when ``confirm`` consecutive
    checks proposed the same new start, and not within ``cooldown`` checks of the last move."""

    confirm: int = 2
    cooldown: int = 3
    _candidate: int | None = None
    _seen: int = 0
    _since_move: int = 1 << 30

    def admit(self, decision: MoveDecision) -> bool:
        self._since_move += 1
        if not decision.move:
            self._candidate, self._seen = None, 0
            return False
        if decision.new_start != self._candidate:
            self._candidate, self._seen = decision.new_start, 0
        self._seen += 1
        if self._seen < self.confirm or self._since_move <= self.cooldown:
            return False
        self._candidate, self._seen, self._since_move = None, 0, 0
        return True


# --- how many blocks fit -------------------------------------------------------------


def block_parameter_count(
    hidden_size: int,
    intermediate_size: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    head_dim: int,
    attention_bias: bool = False,
) -> int:
    """Parameters of one Llama-style block (attention, SwiGLU MLP, two norms)."""
    q = hidden_size * num_attention_heads * head_dim
    kv = 2 * hidden_size * num_key_value_heads * head_dim
    o = num_attention_heads * head_dim * hidden_size
    mlp = 3 * hidden_size * intermediate_size
    return q + kv + o + mlp + block_vector_count(hidden_size, num_attention_heads, num_key_value_heads, head_dim,
                                                 attention_bias)


def block_vector_count(hidden_size: int, num_attention_heads: int, num_key_value_heads: int, head_dim: int,
                       attention_bias: bool = False) -> int:
    """Parameters of one block outside its weight matrices: the two norms and the biases."""
    bias = (num_attention_heads + 2 * num_key_value_heads) * head_dim if attention_bias else 0
    return bias + 2 * hidden_size


def block_weight_bytes(params: int, vectors: int, *, elem_bytes: int, quant_block_bytes: int | None = None) -> int:
    """Bytes of a block of ``params`` parameters, ``vectors`` of them norms and biases: the
    matrices at ``quant_block_bytes`` per 32 weights when they are held in a GGUF block format
    (34 for q8_0, 18 for q4_0, 20 for q4_1), else at ``elem_bytes`` each; norms and biases
    always at ``elem_bytes`` (they stay in the run dtype)."""
    if quant_block_bytes is None:
        return params * elem_bytes
    return -(-(params - vectors) * quant_block_bytes // 32) + vectors * elem_bytes


def blocks_that_fit(
    available_bytes: int,
    bytes_per_block: int,
    cache_bytes: int,
    activation_bytes: int,
    num_blocks: int,
    *,
    max_blocks: int | None = None,
    safety: float = 0.8,
) -> int:
    """How many blocks fit in ``available_bytes`` after cache and activation room (at least 1)."""
    room = int(available_bytes * safety) - cache_bytes - activation_bytes
    n = room // max(bytes_per_block, 1) if room > 0 else 0
    n = max(1, min(n, num_blocks))
    if max_blocks is not None and max_blocks > 0:
        n = min(n, max_blocks)
    return n


def available_memory_bytes(device: str) -> int:
    """Free memory on ``device``: CUDA from torch, CPU from /proc/meminfo MemAvailable."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(pages) * os.sysconf("SC_PAGE_SIZE") if pages else 4 << 30
