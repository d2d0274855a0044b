"""A worker's record names its quantization (issue 15): the id's suffix from --quantize or
the GGUF file's own blocks, and for a file that mixes types the ``wt`` field counting them."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("gguf", reason="the gguf package is a runtime dependency; install pymesh")

from pymesh.proto.identity import Identity  # noqa: E402
from pymesh.proto.records import WorkerRecord, split_model_id  # noqa: E402
from pymesh.worker.server import Worker, WorkerOptions  # noqa: E402
from tests.model.test_convert import N_HEAD, N_KV, random_weights  # noqa: E402
from tests.model.tiny import write_tiny_gguf  # noqa: E402


def _record(worker: Worker) -> WorkerRecord:
    rec = WorkerRecord(model_id=worker.model_id, start=0, stop=1, host="127.0.0.1", port=1,
                       weight_types=worker.weight_types).signed(Identity.generate())
    return WorkerRecord.from_bytes_untrusted(rec.to_bytes())


def test_a_mixed_gguf_names_its_majority_type_and_lists_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "tiny.Q8_0.gguf"
    write_tiny_gguf(path, random_weights(tied=True), n_head=N_HEAD, n_head_kv=N_KV, qtype="Q8_0",
                    qtypes={"blk.0.attn_output.weight": "Q4_0", "blk.1.ffn_down.weight": "F32"})
    rec = _record(Worker(WorkerOptions(["127.0.0.1:9"], model_path=str(path))))
    assert split_model_id(rec.model_id)[1] == "q8_0"
    types = dict(rec.weight_types)
    assert types["q4_0"] == 1 and types["float"] >= 1 and types["q8_0"] > types["q4_0"]


def test_a_uniform_gguf_and_a_quantized_folder_need_no_list(tmp_path: Path) -> None:
    from tests.model.tiny import make_tiny_model

    path = tmp_path / "tiny.Q4_1.gguf"
    write_tiny_gguf(path, random_weights(tied=True), n_head=N_HEAD, n_head_kv=N_KV, qtype="Q4_1")
    uniform = Worker(WorkerOptions(["127.0.0.1:9"], model_path=str(path)))
    assert uniform.model_id.endswith(":q4_1") and uniform.weight_types == ()
    folder = make_tiny_model(tmp_path / "tiny", num_hidden_layers=2)
    quantized = Worker(WorkerOptions(["127.0.0.1:9"], model_path=str(folder), quantize="q4_0"))
    plain = Worker(WorkerOptions(["127.0.0.1:9"], model_path=str(folder)))
    assert quantized.model_id == plain.model_id + ":q4_0" and quantized.weight_types == ()
    assert _record(quantized).quant == "q4_0" and _record(plain).quant is None


@pytest.mark.parametrize(("theirs", "ok"), [("m@0123456789ab", True), ("m@0123456789ab:q4_0", True),
                                            ("m@ba9876543210:q8_0", False), ("other@0123456789ab", False)])
def test_a_predecessor_of_another_quantization_of_the_model_is_accepted(theirs: str, ok: bool) -> None:
    """A client routing with --allow-mixed chains quantizations: a q8_0 hop accepts the receipt
    of a float or q4_0 predecessor of the same base id, never one of another model."""
    from pymesh.proto.receipts import Receipt, sign_receipt
    from pymesh.worker.receipts import BadReceipt, StepClaim, check_received

    me = Identity.generate()
    digest = b"\1" * 32
    raw = sign_receipt(me, Receipt(me.peer_id, theirs, b"s" * 16, 0, 0, 1, 0, 2, "float32", "cpu", b"\0" * 32,
                                   digest)).wire
    claim = StepClaim("m@0123456789ab:q8_0", b"s" * 16, 0, 0, 1, 2, 4, "float32", "cpu")
    if ok:
        assert check_received(raw, pusher=me.peer_id, claim=claim, digest=digest).receipt.model == theirs
    else:
        with pytest.raises(BadReceipt, match="in any quantization"):
            check_received(raw, pusher=me.peer_id, claim=claim, digest=digest)
