"""Issue 2: embedded default model and data, clear errors on bad input."""

from __future__ import annotations

import json

import pytest
import torch

from inc_ipamp.data import load_blocks, split_documents, text_file_documents, token_blocks, wiki_documents
from inc_ipamp.errors import DataError, ModelLoadError, UnsupportedModelError
from inc_ipamp.models import default_model_dir, load_model
from inc_ipamp.ops import find_ops


def test_default_model_is_smollm2_llama(small_model):
    model, tok = small_model
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (576, 9, 3, 49152)
    assert cfg.num_hidden_layers == 30
    manifest = json.loads((default_model_dir() / "inc_ipamp_manifest.json").read_text())
    assert manifest["safetensors_size"] > 500e6  # fp32 135M parameters


def test_default_conversion_is_reused(small_model):
    path = default_model_dir() / "model.safetensors"
    before = path.stat().st_mtime_ns
    default_model_dir()
    assert path.stat().st_mtime_ns == before


def test_model_is_sane_on_real_text(small_model, calib_blocks):
    """The converted model must be the real SmolLM2 (perplexity ~20-40 on Wikipedia), not noise."""
    from inc_ipamp.evaluate import perplexity

    ppl = perplexity(small_model[0], calib_blocks)
    assert 5 < ppl < 80, ppl


def test_ops_named_like_optimum_habana(small_model):
    names = [o.name for o in find_ops(small_model[0])]
    assert names[:7] == [f"model.layers.0.self_attn.{n}" for n in
                         ("q_proj", "k_proj", "v_proj", "matmul_qk", "matmul_av", "o_proj")] + [
        "model.layers.0.mlp.gate_proj"]
    assert names[-1] == "lm_head" and len(names) == 30 * 9 + 1


def test_truncated_prefix_for_quick_runs():
    model, _ = load_model(num_layers=2)
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    with pytest.raises(ModelLoadError, match="between 1 and 30"):
        load_model(num_layers=31)


def test_missing_model_path_is_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_unsupported_architecture_is_clear(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               architectures=["BertForMaskedLM"]).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="decoder-only"):
        load_model(str(tmp_path))


def test_calibration_and_evaluation_never_overlap(small_model):
    tok = small_model[1]
    docs = wiki_documents()
    cal, ev = set(split_documents(docs, "calibration")), set(split_documents(docs, "evaluation"))
    assert len(docs) > 50 and not cal & ev
    a = load_blocks(tok, "calibration", 8, 128).ids
    b = load_blocks(tok, "evaluation", 8, 128).ids
    grams = {tuple(r[i:i + 16].tolist()) for r in a for i in range(0, 112, 4)}
    assert not any(tuple(r[i:i + 16].tolist()) in grams for r in b for i in range(112))


def test_blocks_are_spread_over_the_documents(small_model):
    """One block per document before any document gives a second (short ones joined into one unit): consecutive
    blocks of one stream were one Wikipedia article for the whole default calibration."""
    tok = small_model[1]
    words = ["alpha", "bravo", "charlie"]
    docs = [" ".join([w] * 300) for w in words]
    first = tok(" alpha", add_special_tokens=False)["input_ids"][-1]
    got = token_blocks(tok, docs, 5, 64).ids
    ids = {w: set(tok(" ".join([w] * 300), add_special_tokens=False)["input_ids"]) for w in words}
    for row, w in zip(got, ["alpha", "bravo", "charlie", "alpha", "bravo"], strict=True):
        assert set(row.tolist()) <= ids[w] | {tok.eos_token_id}, w
    assert first in got[0].tolist()
    short = token_blocks(tok, ["one two three", "four five six"] * 20, 2, 8).ids  # short documents joined
    assert short.shape == (2, 8) and tok.eos_token_id in short[0].tolist()
    wiki = load_blocks(tok, "calibration", 8, 256).ids
    starts = {tuple(d_ids[:16]) for d_ids in (tok(d, add_special_tokens=False)["input_ids"]
                                              for d in split_documents(wiki_documents(), "calibration")[:40])}
    assert sum(tuple(r[:16].tolist()) in starts for r in wiki) >= 6  # each block opens a different article
    with pytest.raises(DataError, match="only 2 blocks of 64 tokens, 3 asked"):
        token_blocks(tok, [" ".join(["alpha"] * 150)], 3, 64)


def test_blocks_are_deterministic(small_model):
    tok = small_model[1]
    assert torch.equal(load_blocks(tok, "calibration", 2, 32).ids, load_blocks(tok, "calibration", 2, 32).ids)


def test_empty_or_short_data_is_clear(tmp_path, small_model):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(DataError, match="no text"):
        text_file_documents(empty)
    with pytest.raises(DataError, match="not found"):
        text_file_documents(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="fewer than one block"):
        token_blocks(small_model[1], ["just a few words"], 1, 512)
