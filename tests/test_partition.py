"""Partition on tiny locally-built configs of five architectures, with both tracers."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from inc_ipamp.partition import partition_model
from inc_ipamp.records import Partition

KW = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          vocab_size=256)
BUILD = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**KW)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**KW)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**KW)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, bos_token_id=0,
                                               eos_token_id=0)),
    "opt": lambda: OPTForCausalLM(OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                            vocab_size=256, word_embed_proj_dim=64, bos_token_id=0, eos_token_id=0,
                                            pad_token_id=1)),
}
LLAMA_LAYER = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.matmul_qk",
                "self_attn.matmul_av"], ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
# GPT-2's fused c_attn emits ONE tensor that every path to qk/av goes through, so it is a cut point of its own;
# the q/k/v fork happens after it (split), which is why qk and av share a group (as q,k,v,qk,av do in Llama).
GPT2_LAYER = [["attn.c_attn"], ["attn.matmul_qk", "attn.matmul_av"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]
OPT_LAYER = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.matmul_qk",
              "self_attn.matmul_av"], ["self_attn.out_proj"], ["fc1"], ["fc2"]]


def _expected(prefix: str, layer_groups: list[list[str]], n_layers: int = 2) -> list[list[str]]:
    out = [[f"{prefix}.{i}.{s}" for s in grp] for i in range(n_layers) for grp in layer_groups]
    return out + [["lm_head"]]


EXPECTED = {
    "llama": _expected("model.layers", LLAMA_LAYER),
    "qwen2": _expected("model.layers", LLAMA_LAYER),
    "mistral": _expected("model.layers", LLAMA_LAYER),
    "gpt2": _expected("transformer.h", GPT2_LAYER),
    "opt": _expected("model.decoder.layers", OPT_LAYER),
}


@pytest.mark.parametrize("method", ["torch.export", "dataflow"])
@pytest.mark.parametrize("arch", list(BUILD))
def test_groups_exact(arch: str, method: str) -> None:
    torch.manual_seed(0)
    model = BUILD[arch]().eval()
    part = partition_model(model, method=method)
    assert part.method == method
    assert [g.ops for g in part.groups] == EXPECTED[arch]
    # equal layer structure => equal signatures, so timings measured on layer 0 are reused for layer 1
    per_layer = len(EXPECTED[arch]) // 2
    sig = [g.signature for g in part.groups]
    assert sig[:per_layer] == sig[per_layer:2 * per_layer]
    assert len(set(sig[:per_layer])) == per_layer
    assert [g.layer for g in part.groups][-1] is None
    # round trip through the record
    assert Partition.from_json(part.to_json()) == part


def test_llama_attention_group_has_32_configs() -> None:
    part = partition_model(BUILD["llama"]().eval())
    assert len(part.groups[0].configs(["fp32", "int8"])) == 32


def test_export_failure_falls_back_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a, **k):
        raise RuntimeError("export refused")

    monkeypatch.setattr(torch.export, "export", boom)
    part = partition_model(BUILD["llama"]().eval())
    assert part.method == "dataflow"
    assert any("export refused" in n and "data-flow" in n for n in part.notes)
    assert [g.ops for g in part.groups] == EXPECTED["llama"]


def test_signature_depends_on_shapes() -> None:
    torch.manual_seed(0)
    a = partition_model(LlamaForCausalLM(LlamaConfig(**KW)).eval())
    b = partition_model(LlamaForCausalLM(LlamaConfig(**{**KW, "intermediate_size": 96})).eval())
    assert a.groups[0].signature == b.groups[0].signature  # attention unchanged
    assert a.groups[2].signature != b.groups[2].signature  # gate/up weights differ
