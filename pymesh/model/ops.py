"""Fused ops for the model code: checks in Python, compute in ``pymesh._C``.

Each op validates device, dtype, shape and layout, then hands raw pointers,
element strides and a dtype code to the C++ (or CUDA) kernel. When ``_C`` is
missing the pure-torch reference in :mod:`pymesh.model.ops_ref` runs instead,
with a warning once; with ``PYMESH_REQUIRE_C=1`` that is an error instead, so a
broken build cannot pass the tests on the reference.

The kernels do not record autograd: call them under ``torch.inference_mode()``
(or ``no_grad``). With gradients enabled and an input that requires them, the
reference runs (an error under ``PYMESH_REQUIRE_C=1``).
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F

from pymesh.errors import PymeshError
from pymesh.model import ops_ref, qops
from pymesh.model.quant import QTensor, Weight
from pymesh.model.switches import SWITCHES

_REQUIRED = ("rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul", "linear",
             "linear_max_rows")
_IMPORT_ERROR: str | None = None
try:
    from pymesh import _C
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    _C = None  # type: ignore[assignment]  # typed as the module (pymesh/_C.pyi); None means "missing"
    _IMPORT_ERROR = str(exc)
else:
    _missing = [name for name in _REQUIRED if not hasattr(_C, name)]
    if _missing:  # an old build left in place: treat it as missing, say how to fix it
        _C = None  # type: ignore[assignment]
        _IMPORT_ERROR = f"stale build, lacks {', '.join(_missing)}"

__all__ = [
    "_C",
    "KernelInputError",
    "KernelUnavailableError",
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "linear",
    "kernel_stats",
    "reset_kernel_stats",
    "using_c",
    "LINEAR_MAX_ROWS",
]

logger = logging.getLogger(__name__)

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_OPS = ("rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul", "linear", "qlinear")
_stats: dict[str, int] = dict.fromkeys(_OPS, 0)
_warned: set[str] = set()

#: Largest number of rows of ``x`` that :func:`linear` sends to the GEMV kernel.
LINEAR_MAX_ROWS = _C.linear_max_rows() if _C is not None else 32


class KernelInputError(PymeshError, ValueError):
    """A fused op was called with tensors of the wrong device, dtype, shape or layout."""


class KernelUnavailableError(PymeshError):
    """``pymesh._C`` (or its CUDA part) is missing while ``PYMESH_REQUIRE_C=1`` demands it."""


def using_c() -> bool:
    """Whether the compiled CPU kernels are importable."""
    return _C is not None


def kernel_stats() -> dict[str, int]:
    """How many calls of each op went into ``_C`` since import (or the last reset)."""
    return dict(_stats)


def reset_kernel_stats() -> None:
    for op in _OPS:
        _stats[op] = 0


# ---------------------------------------------------------------- dispatch helpers

def _require_c() -> bool:
    return SWITCHES.require_c


def _fallback(op: str, why: str) -> None:
    """Called before running the reference instead of _C: error or warn once."""
    if _require_c():
        raise KernelUnavailableError(
            f"{op}: {why}; PYMESH_REQUIRE_C=1 forbids the pure-torch fallback "
            "(rebuild with `pip install -e . --no-deps` or unset PYMESH_REQUIRE_C)")
    if why not in _warned:
        _warned.add(why)
        warnings.warn(f"pymesh fused ops: {why}; using the slower pure-torch reference",
                      RuntimeWarning, stacklevel=3)
        logger.warning("fused ops fall back to the pure-torch reference: %s", why)


def _backend(op: str, t: torch.Tensor, *others: torch.Tensor | None):  # type: ignore[no-untyped-def]
    """The kernel module for ``t``'s device (``_C`` or ``_C.cuda``), or None for the reference."""
    if torch.is_grad_enabled() and (t.requires_grad or any(
            o is not None and o.requires_grad for o in others)):
        _fallback(op, "inputs require grad and the kernels have no autograd "
                      "(run the model under torch.inference_mode())")
        return None
    kind = t.device.type
    if kind == "cpu":
        if _C is None:
            _fallback(op, f"pymesh._C is unusable ({_IMPORT_ERROR})")
            return None
        return _C
    if kind == "cuda":
        if _C is None:
            _fallback(op, f"pymesh._C is unusable ({_IMPORT_ERROR})")
            return None
        if not _C.has_cuda:
            _fallback(op, "pymesh._C was built without CUDA kernels (no CUDA compiler at build time)")
            return None
        return _C.cuda
    if kind not in _warned:
        _warned.add(kind)
        logger.info("no fused kernels for device %s; using the pure-torch reference", kind)
    return None


def _code(op: str, t: torch.Tensor) -> int:
    code = _DTYPE_CODES.get(t.dtype)
    if code is None:
        raise KernelInputError(
            f"{op}: dtype {t.dtype} is not supported; use float32, float16 or bfloat16")
    return code


def _same(op: str, name: str, t: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    if t.device != like.device:
        raise KernelInputError(
            f"{op}: {name} is on {t.device} but {like_name} is on {like.device}; "
            "move them to one device")
    if t.dtype != like.dtype:
        raise KernelInputError(
            f"{op}: {name} has dtype {t.dtype} but {like_name} has {like.dtype}; "
            f"convert {name} with .to({like.dtype})")


def _rows(op: str, name: str, t: torch.Tensor, tail: int = 1) -> tuple[int, int]:
    """``(rows, row_stride)`` of ``t`` seen as ``[rows, *t.shape[-tail:]]``.

    The last dim must be contiguous and the leading dims must collapse into
    one strided dim (true for contiguous tensors and for slices of the last dims).
    """
    if t.dim() < tail:
        raise KernelInputError(f"{op}: {name} needs at least {tail} dims, got shape {tuple(t.shape)}")
    inner = 1
    for size in t.shape[t.dim() - tail:]:
        inner *= size
    if t.is_contiguous():
        rows = t.numel() // inner if inner else 0
        return rows, inner
    if t.stride(-1) != 1 and t.shape[-1] != 1:
        raise KernelInputError(
            f"{op}: {name} must be contiguous in its last dim (stride {t.stride(-1)}); "
            "call .contiguous() first")
    lead = t.dim() - tail
    if lead == 0:
        return 1, inner
    rows, stride = 1, None
    for i in range(lead - 1, -1, -1):
        size = t.shape[i]
        if size == 1:
            continue
        if stride is None:
            stride = t.stride(i)
        elif t.stride(i) != t.stride(i + 1) * t.shape[i + 1] and t.shape[i + 1] != 1:
            raise KernelInputError(
                f"{op}: the leading dims of {name} (shape {tuple(t.shape)}, strides "
                f"{t.stride()}) do not flatten to one strided dim; call .contiguous() first")
        rows *= size
    return rows, stride if stride is not None else inner


def _launch(backend, name: str, t: torch.Tensor, *args: object) -> None:  # type: ignore[no-untyped-def]
    """``backend.<name>(*args, threads)`` on CPU; on CUDA with t's device current and its stream."""
    if backend is _C:
        getattr(_C, name)(*args, torch.get_num_threads())
        return
    with torch.cuda.device(t.device):
        getattr(backend, name)(*args, int(torch.cuda.current_stream(t.device).cuda_stream))


def _check_weight(op: str, weight: torch.Tensor, x: torch.Tensor, hidden: int) -> None:
    _same(op, "weight", weight, x, "x")
    if weight.dim() != 1 or weight.shape[0] != hidden:
        raise KernelInputError(
            f"{op}: weight must have shape ({hidden},) to match x's last dim, got {tuple(weight.shape)}")
    if not weight.is_contiguous():
        raise KernelInputError(f"{op}: weight must be contiguous")


# ---------------------------------------------------------------- checked paths

def _rms_norm_checked(x: torch.Tensor, weight: torch.Tensor, eps: float,
                      out: torch.Tensor | None) -> torch.Tensor:
    code = _code("rms_norm", x)
    hidden = x.shape[-1] if x.dim() else 0
    _check_weight("rms_norm", weight, x, hidden)
    rows, x_stride = _rows("rms_norm", "x", x)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        _same("rms_norm", "out", out, x, "x")
        if out.shape != x.shape or not out.is_contiguous():
            raise KernelInputError(
                f"rms_norm: out must be contiguous with x's shape {tuple(x.shape)}, got "
                f"{tuple(out.shape)} (contiguous={out.is_contiguous()})")
    backend = _backend("rms_norm", x, weight)
    if backend is None:
        out.copy_(ops_ref.rms_norm_ref(x, weight, eps))
        return out
    if rows:
        _launch(backend, "rms_norm", x, out.data_ptr(), hidden, x.data_ptr(), x_stride,
                weight.data_ptr(), rows, hidden, float(eps), code)
    _stats["rms_norm"] += 1
    return out


def _fused_add_rms_norm_checked(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                eps: float) -> None:
    op = "fused_add_rms_norm"
    code = _code(op, x)
    _same(op, "residual", residual, x, "x")
    if residual.shape != x.shape:
        raise KernelInputError(
            f"{op}: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    hidden = x.shape[-1] if x.dim() else 0
    _check_weight(op, weight, x, hidden)
    rows, x_stride = _rows(op, "x", x)
    _, res_stride = _rows(op, "residual", residual)
    backend = _backend(op, x, residual, weight)
    if backend is None:
        ops_ref.fused_add_rms_norm_ref(x, residual, weight, eps)
        return
    if rows:
        _launch(backend, op, x, x.data_ptr(), x_stride, residual.data_ptr(), res_stride,
                weight.data_ptr(), rows, hidden, float(eps), code)
    _stats[op] += 1


def _rotary_embedding_checked(q: torch.Tensor, k: torch.Tensor | None, positions: torch.Tensor,
                              cos: torch.Tensor, sin: torch.Tensor) -> None:
    op = "rotary_embedding"
    code = _code(op, q)
    if q.dim() < 2:
        raise KernelInputError(f"{op}: q must be [..., heads, head_dim], got shape {tuple(q.shape)}")
    head_dim = q.shape[-1]
    tokens = positions.numel()
    q_rows, q_tok_stride = _rows(op, "q", q, tail=2)
    if q_rows != tokens:
        raise KernelInputError(
            f"{op}: q shape {tuple(q.shape)} holds {q_rows} tokens but positions has {tokens}")
    if k is not None:
        _same(op, "k", k, q, "q")
        if k.dim() < 2 or k.shape[-1] != head_dim:
            raise KernelInputError(
                f"{op}: k must be [..., kv_heads, {head_dim}], got shape {tuple(k.shape)}")
        k_rows, k_tok_stride = _rows(op, "k", k, tail=2)
        if k_rows != tokens:
            raise KernelInputError(
                f"{op}: k shape {tuple(k.shape)} holds {k_rows} tokens but positions has {tokens}")
    if positions.dtype != torch.int64:
        raise KernelInputError(f"{op}: positions must be int64, got {positions.dtype}")
    if positions.device != q.device:
        raise KernelInputError(f"{op}: positions is on {positions.device}, q on {q.device}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dtype != torch.float32 or table.dim() != 2 or table.device != q.device:
            raise KernelInputError(
                f"{op}: {name} must be a float32 [max_pos, rot_dim // 2] table on {q.device}, "
                f"got {table.dtype} {tuple(table.shape)} on {table.device}")
        if not table.is_contiguous():
            raise KernelInputError(f"{op}: {name} must be contiguous")
    if cos.shape != sin.shape:
        raise KernelInputError(f"{op}: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    rot_dim = 2 * cos.shape[1]
    if rot_dim == 0 or rot_dim > head_dim:
        raise KernelInputError(
            f"{op}: tables give rot_dim {rot_dim}, which must be in 1..head_dim ({head_dim})")
    backend = _backend(op, q, k)
    if backend is None:
        ops_ref.rotary_embedding_ref(q, k, positions, cos, sin)
        return
    if tokens:
        pos = positions.contiguous()
        kp, kts, khs, kh = (0, 0, 0, 0) if k is None else (
            k.data_ptr(), k_tok_stride, k.stride(-2), k.shape[-2])
        _launch(backend, op, q, q.data_ptr(), q_tok_stride, q.stride(-2), q.shape[-2], kp, kts,
                khs, kh, head_dim, pos.data_ptr(), tokens, cos.data_ptr(), sin.data_ptr(),
                rot_dim, cos.shape[0], code)
    _stats[op] += 1


def _silu_and_mul_checked(gate: torch.Tensor, up: torch.Tensor,
                          out: torch.Tensor | None) -> torch.Tensor:
    op = "silu_and_mul"
    code = _code(op, gate)
    _same(op, "up", up, gate, "gate")
    if up.shape != gate.shape:
        raise KernelInputError(f"{op}: up shape {tuple(up.shape)} != gate shape {tuple(gate.shape)}")
    width = gate.shape[-1] if gate.dim() else 0
    rows, g_stride = _rows(op, "gate", gate)
    _, u_stride = _rows(op, "up", up)
    if out is None:
        out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    else:
        _same(op, "out", out, gate, "gate")
        if out.shape != gate.shape or not out.is_contiguous():
            raise KernelInputError(
                f"{op}: out must be contiguous with shape {tuple(gate.shape)}, got {tuple(out.shape)}")
    backend = _backend(op, gate, up)
    if backend is None:
        out.copy_(ops_ref.silu_and_mul_ref(gate, up))
        return out
    if rows and width:
        _launch(backend, op, gate, out.data_ptr(), width, gate.data_ptr(), g_stride,
                up.data_ptr(), u_stride, rows, width, code)
    _stats[op] += 1
    return out



# ---------------------------------------------------------------- the ops
# Each op first tries a fast path for the common case (CPU, contiguous, one
# dtype, no autograd): decode calls are a few microseconds, so Python overhead
# matters. Anything else goes through the checked path, which validates in
# detail, handles strides and CUDA, and raises clear errors.

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """``weight * rms_normalised(x)`` over the last dim; ``x`` may be row-strided."""
    code = _DTYPE_CODES.get(x.dtype)
    if (code is not None and _C is not None and x.is_cpu and weight.is_cpu
            and weight.dtype == x.dtype and x.is_contiguous() and weight.is_contiguous()
            and weight.dim() == 1 and x.dim() and weight.shape[0] == x.shape[-1] > 0
            and (out is None or (out.is_cpu and out.dtype == x.dtype and out.is_contiguous()
                                 and out.shape == x.shape))
            and (not (x.requires_grad or weight.requires_grad) or not torch.is_grad_enabled())):
        hidden = x.shape[-1]
        if out is None:
            out = torch.empty_like(x)
        rows = x.numel() // hidden
        if rows:
            _C.rms_norm(out.data_ptr(), hidden, x.data_ptr(), hidden, weight.data_ptr(), rows,
                        hidden, eps, code, torch.get_num_threads())
        _stats["rms_norm"] += 1
        return out
    return _rms_norm_checked(x, weight, eps, out)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> None:
    """In place: ``residual += x``; ``x = rms_norm(residual) * weight``."""
    code = _DTYPE_CODES.get(x.dtype)
    if (code is not None and _C is not None and x.is_cpu and residual.is_cpu and weight.is_cpu
            and residual.dtype == x.dtype and weight.dtype == x.dtype
            and x.is_contiguous() and residual.is_contiguous() and weight.is_contiguous()
            and weight.dim() == 1 and x.dim() and weight.shape[0] == x.shape[-1] > 0
            and residual.shape == x.shape and (not (x.requires_grad or residual.requires_grad or weight.requires_grad) or not torch.is_grad_enabled())):
        hidden = x.shape[-1]
        rows = x.numel() // hidden
        if rows:
            _C.fused_add_rms_norm(x.data_ptr(), hidden, residual.data_ptr(), hidden,
                                  weight.data_ptr(), rows, hidden, eps, code,
                                  torch.get_num_threads())
        _stats["fused_add_rms_norm"] += 1
        return
    _fused_add_rms_norm_checked(x, residual, weight, eps)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor | None, positions: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate-half rotary embedding, in place on ``q`` and ``k``.

    ``q [..., n_heads, head_dim]``, ``k [..., n_kv_heads, head_dim]`` (or None):
    leading dims flatten to ``positions.numel()`` tokens; last dim contiguous,
    other strides free. ``cos``/``sin``: float32 ``[max_pos, rot_dim // 2]``
    (``rot_dim <= head_dim``; the rest of each head is left unchanged).
    """
    code = _DTYPE_CODES.get(q.dtype)
    if (code is not None and _C is not None and k is not None and q.is_cpu and k.is_cpu
            and positions.is_cpu and cos.is_cpu and sin.is_cpu and k.dtype == q.dtype
            and positions.dtype == torch.int64 and cos.dtype == torch.float32
            and sin.dtype == torch.float32 and q.is_contiguous() and k.is_contiguous()
            and positions.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()
            and q.dim() >= 2 and k.dim() >= 2 and cos.dim() == 2 and cos.shape == sin.shape
            and k.shape[-1] == q.shape[-1] >= 2 * cos.shape[1] > 0 and (not (q.requires_grad or k.requires_grad) or not torch.is_grad_enabled())):
        head_dim = q.shape[-1]
        q_heads, k_heads = q.shape[-2], k.shape[-2]
        tokens = positions.numel()
        if q.numel() == tokens * q_heads * head_dim and k.numel() == tokens * k_heads * head_dim:
            if tokens:
                _C.rotary_embedding(q.data_ptr(), q_heads * head_dim, head_dim, q_heads,
                                    k.data_ptr(), k_heads * head_dim, head_dim, k_heads,
                                    head_dim, positions.data_ptr(), tokens, cos.data_ptr(),
                                    sin.data_ptr(), 2 * cos.shape[1], cos.shape[0], code,
                                    torch.get_num_threads())
            _stats["rotary_embedding"] += 1
            return
    _rotary_embedding_checked(q, k, positions, cos, sin)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up``; ``gate``/``up`` may be row-strided (halves of one projection)."""
    code = _DTYPE_CODES.get(gate.dtype)
    if (code is not None and _C is not None and gate.is_cpu and up.is_cpu
            and up.dtype == gate.dtype and gate.is_contiguous() and up.is_contiguous()
            and gate.dim() and gate.shape == up.shape and gate.shape[-1] > 0
            and (out is None or (out.is_cpu and out.dtype == gate.dtype and out.is_contiguous()
                                 and out.shape == gate.shape))
            and (not (gate.requires_grad or up.requires_grad) or not torch.is_grad_enabled())):
        width = gate.shape[-1]
        if out is None:
            out = torch.empty_like(gate)
        rows = gate.numel() // width
        if rows:
            _C.silu_and_mul(out.data_ptr(), width, gate.data_ptr(), width, up.data_ptr(), width,
                            rows, width, code, torch.get_num_threads())
        _stats["silu_and_mul"] += 1
        return out
    return _silu_and_mul_checked(gate, up, out)


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``x @ weight.T + bias``: the GEMV kernel for 1..LINEAR_MAX_ROWS rows on CPU, torch otherwise.

    The kernel needs ``weight`` contiguous ``[out, in]`` with x's dtype
    (float32, float16 or bfloat16); anything else goes to ``torch.nn.functional.linear``.
    A quantized weight (:class:`~pymesh.model.quant.QTensor`) goes to :func:`pymesh.model.qops.qlinear`.
    """
    if isinstance(weight, QTensor):
        return qops.qlinear(x, weight, bias)
    code = _DTYPE_CODES.get(x.dtype)
    if (code is not None and _C is not None and x.is_cpu and weight.is_cpu
            and weight.dtype == x.dtype and weight.dim() == 2 and x.dim()
            and x.shape[-1] == weight.shape[1] > 0 and weight.is_contiguous()
            and (bias is None or (bias.is_cpu and bias.dtype == x.dtype and bias.dim() == 1
                                  and bias.shape[0] == weight.shape[0] and bias.is_contiguous()))
            and (not (x.requires_grad or weight.requires_grad) or not torch.is_grad_enabled())):
        k = x.shape[-1]
        rows = x.numel() // k
        if 1 <= rows <= LINEAR_MAX_ROWS:
            x2 = x if x.is_contiguous() else x.reshape(rows, k)
            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
            n = weight.shape[0]
            out = torch.empty((*x.shape[:-1], n), dtype=x.dtype)
            _C.linear(out.data_ptr(), x2.data_ptr(), k if x2 is x else x2.stride(0),
                      weight.data_ptr(), 0 if bias is None else bias.data_ptr(), rows, k, n,
                      code, torch.get_num_threads())
            _stats["linear"] += 1
            return out
        return F.linear(x, weight, bias)
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise KernelInputError(
            f"linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match: "
            "weight must be [out_features, in_features] with in_features == x.shape[-1]")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise KernelInputError(
            f"linear: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (x.is_cpu and code is not None and 1 <= rows <= LINEAR_MAX_ROWS
            and weight.dtype == x.dtype and weight.is_cpu and weight.is_contiguous()
            and (bias is None or bias.dtype == x.dtype)):
        # A case the kernel takes, but _C is missing or autograd is on.
        _backend("linear", x, weight, bias)
        return ops_ref.linear_ref(x, weight, bias)
    return F.linear(x, weight, bias)
