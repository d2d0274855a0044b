"""Weight loading: sharded index, reading only the role's shards, errors, dtypes, fingerprints."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

from pymesh.errors import ConfigError
from pymesh.model.fingerprint import model_id
from pymesh.model.head import load_head
from pymesh.model.span import load_span
from pymesh.model.weights import INDEX_FILE, SINGLE_FILE
from tests.model.tiny import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("w"), "llama")


def shard_by_block(src: Path, dst: Path) -> Path:
    """Copy ``src`` as one shard per block plus one for the rest, with an index."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / SINGLE_FILE)
    (dst / SINGLE_FILE).unlink()
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        groups.setdefault(f"block-{m.group(1)}.safetensors" if m else "rest.safetensors", {})[name] = t
    weight_map = {}
    for fname, group in groups.items():
        save_file(group, dst / fname)
        weight_map.update(dict.fromkeys(group, fname))
    (dst / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_sharded_loads_only_needed_shards(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sharded = shard_by_block(tiny, tmp_path / "sharded")
    opened: list[str] = []
    real = safetensors.safe_open

    def spy(path: str, *a: object, **kw: object) -> object:
        opened.append(Path(path).name)
        return real(path, *a, **kw)

    monkeypatch.setattr(safetensors, "safe_open", spy)
    one = load_span(sharded, 1, 2)
    assert opened == ["block-1.safetensors"]
    opened.clear()
    load_head(sharded)
    assert opened == ["rest.safetensors"]
    monkeypatch.undo()
    # same numbers as the single-file folder
    ref = load_span(tiny, 1, 2)
    for a, b in zip(vars_of(one.blocks[0]), vars_of(ref.blocks[0])):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def vars_of(block: object) -> list[torch.Tensor]:
    return [getattr(block, s) for s in block.__slots__ if isinstance(getattr(block, s), torch.Tensor)]


def test_dtype_conversion_and_tied_head(tiny: Path, tmp_path: Path) -> None:
    span = load_span(tiny, 0, 1, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in vars_of(span.blocks[0]))
    assert span.cache_bytes_per_token() == 1 * 2 * 2 * 16 * 2
    head = load_head(tiny, dtype=torch.bfloat16)
    assert head.lm_head.dtype == torch.bfloat16 and head.lm_head is not head.embed_tokens
    tied = make_tiny_model(tmp_path, "llama", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(tied / SINGLE_FILE)
    h = load_head(tied)
    assert h.lm_head is h.embed_tokens


def test_missing_and_misshaped_tensors_name_tensor_and_file(tiny: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    tensors = load_file(broken / SINGLE_FILE)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.2.self_attn.o_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, broken / SINGLE_FILE)
    load_span(broken, 0, 1)  # block 0 is intact and loads
    with pytest.raises(ConfigError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight is missing from .*model\.safetensors"):
        load_span(broken, 1, 2)
    with pytest.raises(ConfigError, match=r"model\.layers\.2\.self_attn\.o_proj\.weight in .*model\.safetensors has shape \(3, 3\)"):
        load_span(broken, 2, 3)
    with pytest.raises(ConfigError, match=r"blocks \[2, 4\) do not exist: the model has 3 blocks"):
        load_span(tiny, 2, 4)
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(tiny / "config.json", empty / "config.json")
    with pytest.raises(ConfigError, match="neither model.safetensors nor"):
        load_span(empty, 0, 1)


def test_model_id_depends_on_config_headers_and_values(tiny: Path, tmp_path: Path) -> None:
    mid = model_id(tiny, "tiny")
    name, _, fp = mid.partition("@")
    assert name == "tiny" and re.fullmatch(r"[0-9a-f]{12}", fp)
    assert model_id(tiny).startswith(tiny.name + "@")
    # the same tensors laid out in shards: same names, shapes, dtypes -> same fingerprint
    assert model_id(shard_by_block(tiny, tmp_path / "s"), "tiny") == mid
    # different values, same header: another id (sampled values are hashed: tests/model/test_fingerprint.py)
    other = tmp_path / "other"
    shutil.copytree(tiny, other)
    tensors = load_file(other / SINGLE_FILE)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, other / SINGLE_FILE)
    assert model_id(other, "tiny") != mid
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.bfloat16)
    save_file(tensors, other / SINGLE_FILE)
    assert model_id(other, "tiny") != mid
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    shutil.copy(tiny / SINGLE_FILE, other / SINGLE_FILE)
    (other / "config.json").write_text(json.dumps(cfg, indent=4))
    assert model_id(other, "tiny") != mid
    with pytest.raises(ConfigError, match="contain no '@'"):
        model_id(tiny, "a@b")
