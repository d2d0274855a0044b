"""Model fingerprints separate weights: sampled value bytes of every tensor are hashed.

Synthetic folders (a config.json and one safetensors file written here), no transformers:
the embedding is larger than FULL_HASH_BYTES, so it is sampled; the rest is hashed whole.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from pymesh.errors import ConfigError
from pymesh.model.fingerprint import (FULL_HASH_BYTES, SAMPLE_WINDOWS, WINDOW_BYTES, fingerprint, model_id,
                                      sample_ranges)
from pymesh.model.weights import INDEX_FILE, SINGLE_FILE

EMBED = "model.embed_tokens.weight"


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        EMBED: torch.randn(2048, 64, generator=g),  # 512 KiB: sampled
        "model.layers.0.mlp.up_proj.weight": torch.randn(160, 64, generator=g),  # 40 KiB: whole
        "model.norm.weight": torch.ones(64),
    }


def folder(path: Path, tensors: dict[str, torch.Tensor], config: dict[str, object] | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config or {"hidden_size": 64, "num_hidden_layers": 1}))
    save_file(tensors, str(path / SINGLE_FILE))
    return path


def write_raw(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """A safetensors file with the tensors' data in exactly this order (save_file picks its own)."""
    header: dict[str, object] = {}
    blobs, offset = [], 0
    for name, t in tensors:
        blob = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def test_sample_ranges_cover_ends_and_stay_inside() -> None:
    assert sample_ranges(0) == [(0, 0)]
    assert sample_ranges(FULL_HASH_BYTES) == [(0, FULL_HASH_BYTES)]
    for n in (FULL_HASH_BYTES + 1, 512 * 1024, 10**9 + 7):
        r = sample_ranges(n)
        assert len(r) == SAMPLE_WINDOWS and r[0] == (0, WINDOW_BYTES) and r[-1] == (n - WINDOW_BYTES, n)
        assert all(0 <= a < b <= n and b - a == WINDOW_BYTES for a, b in r)
        assert [a for a, _ in r] == sorted(a for a, _ in r)


def test_same_weights_same_id_any_layout(tmp_path: Path) -> None:
    w = weights()
    mid = model_id(folder(tmp_path / "a", w), "m")
    assert model_id(folder(tmp_path / "b", weights()), "m") == mid
    # the same tensors in another order inside the file, and split into two shards
    c = tmp_path / "c"
    c.mkdir()
    (c / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    write_raw(c / SINGLE_FILE, sorted(w.items(), reverse=True))
    assert model_id(c, "m") == mid
    d = tmp_path / "d"
    d.mkdir()
    (d / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    write_raw(d / "one.safetensors", [(EMBED, w[EMBED])])
    rest = [(k, v) for k, v in w.items() if k != EMBED]
    write_raw(d / "two.safetensors", rest)
    index = {"weight_map": {EMBED: "one.safetensors", **{k: "two.safetensors" for k, _ in rest}}}
    (d / INDEX_FILE).write_text(json.dumps(index))
    assert model_id(d, "m") == mid


@pytest.mark.parametrize("where", ["norm", "up_proj_middle", "embed_first", "embed_last", "embed_window_5"])
def test_one_sampled_value_changes_the_id(tmp_path: Path, where: str) -> None:
    base = fingerprint(folder(tmp_path / "base", weights()))
    w = weights()
    flat = w[EMBED].view(-1)
    if where == "norm":
        w["model.norm.weight"][17] = 1.0001
    elif where == "up_proj_middle":
        w["model.layers.0.mlp.up_proj.weight"][80, 31] += 1e-6
    elif where == "embed_first":
        flat[0] = 0.5
    elif where == "embed_last":
        flat[-1] = 0.5
    else:
        a, _ = sample_ranges(flat.numel() * 4)[5]
        flat[a // 4 + 3] += 1e-3
    assert fingerprint(folder(tmp_path / "changed", w)) != base


def test_one_value_outside_the_samples_is_the_documented_limit(tmp_path: Path) -> None:
    """Sampling: an edit confined to bytes between windows of a large tensor keeps the id
    (the module docstring says so; spot checks, not ids, catch a worker lying about weights)."""
    base = fingerprint(folder(tmp_path / "base", weights()))
    w = weights()
    flat = w[EMBED].view(-1)
    (_, end3), (start4, _) = sample_ranges(flat.numel() * 4)[3:5]
    assert start4 - end3 > 8
    flat[(end3 + start4) // 8] += 1.0  # an element between windows 3 and 4
    assert fingerprint(folder(tmp_path / "edited", w)) == base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fine_tune_of_every_weight_changes_the_id(tmp_path: Path, dtype: torch.dtype) -> None:
    """Every value moved by ~1e-3 of its size, as a short fine-tune or a merged LoRA does."""
    w = {k: v.to(dtype) for k, v in weights().items()}
    base = fingerprint(folder(tmp_path / "base", w))
    g = torch.Generator().manual_seed(1)
    tuned = {k: (v.float() * (1 + 1e-3 * torch.randn(v.shape, generator=g))).to(dtype) for k, v in w.items()}
    assert fingerprint(folder(tmp_path / "tuned", tuned)) != base
    # only the big sampled tensor tuned: still another id
    only = dict(w, **{EMBED: tuned[EMBED]})
    assert fingerprint(folder(tmp_path / "only-embed", only)) != base


def test_bad_data_offsets_are_config_errors(tmp_path: Path) -> None:
    p = folder(tmp_path / "m", weights())
    blob = (p / SINGLE_FILE).read_bytes()
    (p / SINGLE_FILE).write_bytes(blob[:-100])  # truncated: the last tensor runs past the end
    with pytest.raises(ConfigError, match=r"data_offsets .* outside the file's .* re-download"):
        fingerprint(p)


def _header_file(path: Path, entry: object, data: bytes) -> None:
    raw = json.dumps({"t": entry}).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                         st.text(max_size=4))
_entries = st.one_of(
    _json_scalar,
    st.lists(_json_scalar, max_size=3),
    st.fixed_dictionaries({"dtype": _json_scalar, "shape": _json_scalar,
                           "data_offsets": st.one_of(_json_scalar, st.lists(_json_scalar, max_size=3))}),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entry=_entries, data=st.binary(max_size=64))
def test_fuzzed_headers_raise_config_error_or_hash(tmp_path: Path, entry: object, data: bytes) -> None:
    """A model file is written by whoever published it: any header either hashes or is one ConfigError."""
    p = tmp_path / "fuzz"
    p.mkdir(exist_ok=True)
    (p / "config.json").write_text("{}")
    _header_file(p / SINGLE_FILE, entry, data)
    try:
        fp = fingerprint(p)
    except ConfigError:
        return
    assert len(fp) == 12
