"""Shared fixtures: the real embedded default model (all 30 layers, loaded once) and shipped data."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the suite tests INC's CPU paths; INC picks its accelerator at import and prefers a visible GPU, where its FP8 Q/DQ
# prepare leaves CPU Linears unpatched (seen on an H100 machine)
os.environ.setdefault("INC_TARGET_DEVICE", "cpu")


@pytest.fixture(scope="session")
def small_model():
    """(model, tokenizer) of the full 30-layer SmolLM2-135M, attention routed. Short sequences keep it fast;
    a truncated prefix would be a broken language model (perplexity ~1e8), useless for sensitivities."""
    from inc_ipamp.models import load_model
    from inc_ipamp.ops import install_attention

    model, tok = load_model()
    install_attention(model)
    return model, tok


@pytest.fixture(scope="session")
def calib_blocks(small_model):
    from inc_ipamp.data import load_blocks

    return load_blocks(small_model[1], "calibration", 4, 64)


@pytest.fixture(scope="session")
def small_sensitivity(small_model, calib_blocks):
    from inc_ipamp.sensitivity import calibrate

    return calibrate(small_model[0], calib_blocks, progress=False, noise="all")  # every noise model's sums


@pytest.fixture(scope="module")
def tiny_llama():
    """A fresh 2-layer random Llama per test module (hidden 64, 4/2 GQA heads, vocab 256, seed 0): the real model's
    structure (attention groups, signatures, lm_head) in milliseconds, for tests of the machinery, not of numbers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(cfg).eval()
