"""What the client accepts from workers: outputs (shape, dtype, finite) and pm.err blame
(route hops only, blaming themselves or their successor; or their predecessor for a push
whose receipt did not match, which only makes routes avoid the pair). Property tests, bounded."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh.client.blame import Verdict, judge_err
from pymesh.client.checks import output_problem_untrusted
from pymesh.client.routing import SpanOption
from pymesh.model.blobs import tensor_to_blob
from pymesh.proto import session_wire as sw
from pymesh.proto.frames import DTYPE_SIZES, TensorBlob
from pymesh.proto.identity import PeerID


def peer(n: int) -> PeerID:
    return PeerID(bytes([n]) * 32)


ROUTE = [SpanOption(peer(1), 0, 2), SpanOption(peer(2), 2, 4), SpanOption(peer(3), 4, 6)]


def test_honest_output_passes_and_each_kind_of_wrong_one_is_named() -> None:
    x = torch.randn(1, 3, 8)
    assert output_problem_untrusted(tensor_to_blob(x), "float32", (1, 3, 8)) is None
    assert "shape [1, 3, 7]" in (output_problem_untrusted(tensor_to_blob(x[..., :7].contiguous()), "float32",
                                                          (1, 3, 8)) or "")
    assert "dtype float16" in (output_problem_untrusted(tensor_to_blob(x.half()), "float32", (1, 3, 8)) or "")
    x[0, 1, 2] = float("inf")
    assert "non-finite" in (output_problem_untrusted(tensor_to_blob(x), "float32", (1, 3, 8)) or "")


@settings(max_examples=200)
@given(dtype=st.sampled_from(sorted(DTYPE_SIZES)), shape=st.lists(st.integers(0, 5), max_size=4),
       data=st.data())
def test_any_blob_gets_an_answer_never_an_exception(dtype: str, shape: list[int], data: st.DataObject) -> None:
    n = DTYPE_SIZES[dtype]
    for d in shape:
        n *= d
    blob = TensorBlob(dtype, tuple(shape), memoryview(data.draw(st.binary(min_size=n, max_size=n))))
    problem = output_problem_untrusted(blob, "float32", (1, 2, 3))
    assert problem is None or isinstance(problem, str)
    if dtype != "float32" or tuple(shape) != (1, 2, 3):
        assert problem is not None


@settings(max_examples=300)
@given(sender=st.integers(1, 4), blame=st.one_of(st.none(), st.integers(1, 4)), start=st.sampled_from([0, 2, 4, 6]),
       code=st.sampled_from(list(sw.ErrorCode)), link=st.booleans())
def test_err_blames_only_the_sender_or_its_successor(sender: int, blame: int | None, start: int,
                                                     code: sw.ErrorCode, link: bool) -> None:
    err = sw.Err(b"sid", 0, code, "x", start, start + 2, peer(blame) if blame is not None else None, link)
    verdict = judge_err(ROUTE, peer(sender), err)
    on_route = any(o.peer == peer(sender) and o.start == start for o in ROUTE)
    if not on_route:
        assert verdict is None
        return
    allowed = {peer(sender)} | ({peer(sender + 1)} if sender < 3 else set())
    if code == sw.ErrorCode.BAD_RECEIPT and sender > 1 and blame == sender - 1:
        # a hop refused what its predecessor pushed (receipt and tensor disagree): one of the
        # two lies and nothing says which, so the pair is avoided and nobody banned
        assert verdict is not None and verdict.verdict is Verdict.PAIR
        assert verdict.peer == peer(sender) and verdict.sender == ROUTE[sender - 2]
        return
    if blame is not None and peer(blame) not in allowed:
        assert verdict is None
        return
    assert verdict is not None and verdict.peer in allowed
    if verdict.verdict is Verdict.LINK:
        assert verdict.peer == peer(sender + 1) and verdict.sender == ROUTE[sender - 1]
