"""Petals 2.2.0 client: 128-token prompt, 64 greedy new tokens inside one inference session per run.
Prints one JSON line per measured run (after 1 warm-up) + the generated token ids of the first measured run."""
import json
import os
import sys
import time

import torch

torch.set_num_threads(1)

from transformers import AutoTokenizer  # noqa: E402
from petals import AutoDistributedModelForCausalLM  # noqa: E402

MODEL = "/root/.cache/pymesh/models/SmolLM2-135M-Instruct"
PREFIX = "SmolLM2-135M-Instruct-hf"
PROMPT_LEN, NEW_TOKENS, RUNS = 128, 64, 3
initial_peers = [open("/tmp/petals/initial_peer.txt").read().strip()]

# tokenizer.json re-saved in the pre-0.20 merges format for tokenizers 0.14.1 (ids verified identical to tokenizers 0.23.3)
tok = AutoTokenizer.from_pretrained("/tmp/petals/tok")
text = ("The quick brown fox jumps over the lazy dog. " * 20
        + "Once upon a time there was a small village near a river where people grew wheat and told stories. ") * 4
ids = tok(text, return_tensors="pt").input_ids[:, :PROMPT_LEN]
assert ids.shape[1] == PROMPT_LEN, ids.shape

t0 = time.perf_counter()
model = AutoDistributedModelForCausalLM.from_pretrained(
    MODEL, initial_peers=initial_peers, dht_prefix=PREFIX, torch_dtype=torch.float32)
model.eval()
print(f"# model loaded in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)


@torch.inference_mode()
def run_once():
    out = []
    with model.inference_session(max_length=PROMPT_LEN + NEW_TOKENS + 8):
        t_start = time.perf_counter()
        logits = model(ids).logits  # prefill (uses the active session -> KV caches stay on servers)
        nxt = logits[:, -1, :].argmax(-1, keepdim=True)
        t_first = time.perf_counter()
        out.append(int(nxt))
        for _ in range(NEW_TOKENS - 1):
            logits = model(nxt).logits
            nxt = logits[:, -1, :].argmax(-1, keepdim=True)
            out.append(int(nxt))
        t_end = time.perf_counter()
    return {"ttft_s": round(t_first - t_start, 4),
            "decode_tokens_per_s": round((NEW_TOKENS - 1) / (t_end - t_first), 3),
            "total_s": round(t_end - t_start, 3)}, out


w, wids = run_once()
print(json.dumps({"warmup": True, **w}), flush=True)
results, first_ids = [], None
for i in range(RUNS):
    r, gen = run_once()
    if first_ids is None:
        first_ids = gen
    r["same_ids_as_first"] = gen == first_ids
    results.append(r)
    print(json.dumps(r), flush=True)
print(json.dumps({"generated_ids_run1": first_ids}), flush=True)
print(json.dumps({"generated_text_run1": tok.decode(first_ids)}), flush=True)

# correctness reference (after timing): plain local HF greedy on the same prompt, same dtype
if os.environ.get("REF", "1") == "1":
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(MODEL, torch_dtype=torch.float32).eval()
    with torch.inference_mode():  # same manual greedy loop (no EOS stop), local KV cache
        o = ref(ids, use_cache=True)
        nxt = o.logits[:, -1, :].argmax(-1, keepdim=True)
        ref_ids = [int(nxt)]
        for _ in range(NEW_TOKENS - 1):
            o = ref(nxt, past_key_values=o.past_key_values, use_cache=True)
            nxt = o.logits[:, -1, :].argmax(-1, keepdim=True)
            ref_ids.append(int(nxt))
    print(json.dumps({"local_hf_reference_ids": ref_ids, "match": ref_ids == first_ids}), flush=True)
