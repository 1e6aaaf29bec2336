"""Write the engines' module lists (name, class as ``type(m).__name__``) read from their sources.

Run by hand (``python tests/data/engine_modules/build_lists.py``); the tests read the JSON files only. Every
module below is cited to the source line that registers it; nothing is taken from inc_ipamp's own code. The
lists are what ``model.named_modules()`` yields (registration order, ``None`` attributes skipped, a module
object listed once) for a 12-layer model, so ``layers.1`` and ``layers.10``/``layers.11`` both exist.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
N = 12

OH = {"repo": "huggingface/optimum-habana", "commit": "1d8504c6c7666a19d71968dba50976dceaf7c6b6"}
TF = {"repo": "huggingface/transformers", "version": "4.55.4 (the version optimum-habana pins: setup.py "
      "'transformers >= 4.55.0, < 4.56.0'), wheel from PyPI"}
DS = {"repo": "deepspeedai/DeepSpeed", "commit": "edaa7221267243c7be7fb49c5d5f5c4fb97b4641"}
VG = {"repo": "vllm-project/vllm-gaudi", "commit": "091bbadda10bee4fd3f6d0efc1844d2610dd2707"}
VL = {"repo": "vllm-project/vllm", "commit": "e06c9ba2a6ea923a84add30f5dafaea126429b81"}


def _src(base: dict, path: str, what: str) -> dict:
    return {**base, "path": path, "what": what}


def oh_llama(tp: bool = False, fused_qkv: bool = False, qwen2: bool = False) -> list[list[str]]:
    """optimum-habana GaudiLlamaForCausalLM / GaudiQwen2ForCausalLM (adapt_transformers_to_gaudi swaps the classes,
    optimum/habana/transformers/modeling_utils.py:540-541, 737-738)."""
    p = "GaudiQwen2" if qwen2 else "GaudiLlama"
    hf = "Qwen2" if qwen2 else "Llama"
    col = "LinearLayer" if tp else "Linear"  # DeepSpeed auto_tp.py:415 LinearLayer for every other Linear
    row = "ScopedLinearAllReduce" if tp else "Linear"  # auto_tp.py:405 LinearAllreduce (o_proj/down_proj,
    # auto_tp.py:319-321), swapped for ScopedLinearAllReduce by examples/text-generation/utils.py:162-172,561-562
    mods = [["", f"{p}ForCausalLM"], ["model", f"{p}Model"], ["model.embed_tokens", "Embedding"],
            ["model.layers", "ModuleList"]]
    for i in range(N):
        L = f"model.layers.{i}"
        mods += [[L, f"{p}DecoderLayer"], [f"{L}.self_attn", f"{p}Attention"]]
        # LlamaAttention.__init__ (transformers modeling_llama.py:207-216) registers q,k,v,o; with config.fused_qkv
        # GaudiLlamaAttention adds qkv_proj and sets q/k/v to None (modeling_llama.py:471-483)
        if not fused_qkv:
            mods += [[f"{L}.self_attn.{x}_proj", col] for x in "qkv"]
        mods += [[f"{L}.self_attn.o_proj", row]]
        # GaudiLlamaAttention.__init__ modeling_llama.py:460-465 / GaudiQwen2Attention modeling_qwen2.py:286-294
        mods += [[f"{L}.self_attn.matmul_qk", "Matmul"], [f"{L}.self_attn.matmul_av", "Matmul"],
                 [f"{L}.self_attn.k_cache", "KVCache"], [f"{L}.self_attn.v_cache", "KVCache"],
                 [f"{L}.self_attn.rotary_emb", "GaudiRotaryEmbedding" if qwen2 else "GaudiLlamaRotaryEmbedding"]]
        if fused_qkv:
            mods += [[f"{L}.self_attn.qkv_proj", "fused_LinearLayer" if tp else "Linear"]]  # auto_tp.py:411-413
        # modeling_llama.py:485-495 (FusedSDPA importable on Gaudi); the _distributed wrapper is None without
        # sequence parallelism (modeling_llama.py:497-499)
        mods += [[f"{L}.self_attn.fused_scaled_dot_product_attention", "ModuleFusedSDPA"]]
        # GaudiLlamaMLP modeling_llama.py:184-187 / Qwen2MLP (transformers modeling_qwen2.py:39-42)
        mods += [[f"{L}.mlp", f"{p}MLP"], [f"{L}.mlp.gate_proj", col], [f"{L}.mlp.up_proj", col],
                 [f"{L}.mlp.down_proj", row], [f"{L}.mlp.act_fn", "SiLU"],
                 [f"{L}.input_layernorm", f"{hf}RMSNorm"], [f"{L}.post_attention_layernorm", f"{hf}RMSNorm"]]
    mods += [["model.norm", f"{hf}RMSNorm"]]  # GaudiLlamaModel.__init__ has no model.rotary_emb (1151-1177)
    mods += [["lm_head", "LmHeadLinearAllreduce" if tp else "Linear"]]  # auto_tp.py:402-403, 454-456
    return mods


def oh_mixtral(tp: bool = False, experts: int = 8) -> list[list[str]]:
    """optimum-habana GaudiMixtralForCausalLM (modeling_utils.py:670-671 swap MixtralSparseMoeBlock and
    MixtralDecoderLayer); base modules from transformers 4.55.4 modeling_mixtral.py."""
    col = "LinearLayer" if tp else "Linear"
    row = "LinearAllreduce" if tp else "Linear"  # auto_tp.py:319 o_proj, 329 Mixtral w2; no ScopedLinearAllReduce
    # for mixtral (utils.py:561 lists llama, falcon, qwen2, starcoder2, gemma)
    mods = [["", "GaudiMixtralForCausalLM"], ["model", "GaudiMixtralModel"], ["model.embed_tokens", "Embedding"],
            ["model.layers", "ModuleList"]]
    for i in range(N):
        L = f"model.layers.{i}"
        # MixtralAttention (transformers modeling_mixtral.py:246-249); GaudiMixtralAttention
        # (optimum-habana modeling_mixtral.py:325-329): no Matmul modules, attention runs torch.matmul/FusedSDPA
        mods += [[L, "GaudiMixtralDecoderLayer"], [f"{L}.self_attn", "GaudiMixtralAttention"]]
        mods += [[f"{L}.self_attn.{x}_proj", col] for x in "qkv"] + [[f"{L}.self_attn.o_proj", row]]
        mods += [[f"{L}.self_attn.k_cache", "KVCache"], [f"{L}.self_attn.v_cache", "KVCache"],
                 [f"{L}.self_attn.fused_scaled_dot_product_attention", "ModuleFusedSDPA"],
                 [f"{L}.self_attn.rotary_emb", "GaudiLlamaRotaryEmbedding"]]
        # GaudiMixtralSparseMoeBlock modeling_mixtral.py:194-211; the router is skipped by AutoTP
        # (auto_tp.py:375 name == "block_sparse_moe.gate")
        B = f"{L}.block_sparse_moe"
        mods += [[B, "GaudiMixtralSparseMoeBlock"], [f"{B}.gate", "Linear"], [f"{B}.experts", "ModuleList"]]
        for e in range(experts):  # MixtralBlockSparseTop2MLP transformers modeling_mixtral.py:62-66
            E = f"{B}.experts.{e}"
            mods += [[E, "MixtralBlockSparseTop2MLP"], [f"{E}.w1", col], [f"{E}.w2", row], [f"{E}.w3", col],
                     [f"{E}.act_fn", "SiLU"]]
        mods += [[f"{L}.input_layernorm", "MixtralRMSNorm"], [f"{L}.post_attention_layernorm", "MixtralRMSNorm"]]
    mods += [["model.norm", "MixtralRMSNorm"], ["model.rotary_emb", "MixtralRotaryEmbedding"],  # 402-407
             ["lm_head", "LmHeadLinearAllreduce" if tp else "Linear"]]
    return mods


def vllm_llama(row_chunks: bool = False) -> list[list[str]]:
    """vLLM LlamaForCausalLM (vllm/model_executor/models/llama.py) with vllm-gaudi's HPU plugin: attention impl
    HPUAttentionImpl (vllm_gaudi/attention/backends/hpu_attn.py:384-443), RMSNorm -> HPURMSNorm
    (vllm_gaudi/ops/hpu_layernorm.py:7), Llama-3 rope -> HPULlama3RotaryEmbedding (hpu_rotary_embedding.py:399);
    with VLLM_ROW_PARALLEL_CHUNKS > 1 RowParallelLinear -> HPURowParallelLinear (ops/hpu_row_parallel_linear.py:38).
    INC is applied to get_model()'s result itself (vllm_gaudi/v1/worker/hpu_model_runner.py:4808-4858)."""
    row = "HPURowParallelLinear" if row_chunks else "RowParallelLinear"
    mods = [["", "LlamaForCausalLM"], ["model", "LlamaModel"], ["model.embed_tokens", "VocabParallelEmbedding"],
            ["model.layers", "ModuleList"]]
    for i in range(N):
        L = f"model.layers.{i}"
        A = f"{L}.self_attn"
        IM = f"{A}.attn.impl"
        mods += [[L, "LlamaDecoderLayer"], [A, "LlamaAttention"], [f"{A}.qkv_proj", "QKVParallelLinear"],
                 [f"{A}.o_proj", row]]
        if i == 0:  # get_rope returns one cached instance for equal parameters: named_modules lists it once
            mods += [[f"{A}.rotary_emb", "HPULlama3RotaryEmbedding"]]
        mods += [[f"{A}.attn", "Attention"], [IM, "HPUAttentionImpl"],
                 [f"{IM}.matmul_qk", "Matmul"], [f"{IM}.softmax", "Softmax"], [f"{IM}.matmul_av", "Matmul"],
                 [f"{IM}.batch2block_matmul", "B2BMatmul"], [f"{IM}.block2batch_matmul", "B2BMatmul"],
                 [f"{IM}.k_cache", "VLLMKVCache"], [f"{IM}.v_cache", "VLLMKVCache"],
                 [f"{IM}.fused_scaled_dot_product_attention", "ModuleFusedSDPA"]]
        mods += [[f"{L}.mlp", "LlamaMLP"], [f"{L}.mlp.gate_up_proj", "MergedColumnParallelLinear"],
                 [f"{L}.mlp.down_proj", row], [f"{L}.mlp.act_fn", "SiluAndMul"],
                 [f"{L}.input_layernorm", "HPURMSNorm"], [f"{L}.post_attention_layernorm", "HPURMSNorm"]]
    mods += [["model.norm", "HPURMSNorm"], ["lm_head", "ParallelLMHead"], ["logits_processor", "LogitsProcessor"]]
    return mods


OH_SRC = [_src(OH, "optimum/habana/transformers/models/llama/modeling_llama.py", "Gaudi Llama classes"),
          _src(OH, "optimum/habana/transformers/modeling_utils.py", "class swaps (adapt_transformers_to_gaudi)"),
          _src(TF, "transformers/models/llama/modeling_llama.py", "LlamaAttention/LlamaModel base modules")]
TP_SRC = [_src(DS, "deepspeed/module_inject/auto_tp.py", "AutoTP _replace: LinearLayer / LinearAllreduce / "
               "LmHeadLinearAllreduce / fused_LinearLayer"),
          _src(OH, "examples/text-generation/utils.py", "setup_distributed_model: deepspeed.init_inference, "
               "model.module, patch_scoped_linear_all_reduce, then setup_quantization")]
LISTS = {
    "optimum_habana_llama": (oh_llama(), "optimum-habana", OH_SRC),
    "optimum_habana_llama_fused_qkv": (oh_llama(fused_qkv=True), "optimum-habana", OH_SRC),
    "optimum_habana_llama_deepspeed_tp": (oh_llama(tp=True), "optimum-habana", OH_SRC + TP_SRC),
    "optimum_habana_qwen2": (oh_llama(qwen2=True), "optimum-habana",
                             [_src(OH, "optimum/habana/transformers/models/qwen2/modeling_qwen2.py", "Gaudi Qwen2"),
                              _src(TF, "transformers/models/qwen2/modeling_qwen2.py", "Qwen2 base modules")]),
    "optimum_habana_qwen2_deepspeed_tp": (oh_llama(tp=True, qwen2=True), "optimum-habana",
                                          [_src(OH, "optimum/habana/transformers/models/qwen2/modeling_qwen2.py",
                                                "Gaudi Qwen2")] + TP_SRC),
    "optimum_habana_mixtral": (oh_mixtral(), "optimum-habana",
                               [_src(OH, "optimum/habana/transformers/models/mixtral/modeling_mixtral.py",
                                     "GaudiMixtralSparseMoeBlock, GaudiMixtralAttention"),
                                _src(TF, "transformers/models/mixtral/modeling_mixtral.py", "Mixtral base modules")]),
    "optimum_habana_mixtral_deepspeed_tp": (oh_mixtral(tp=True), "optimum-habana",
                                            [_src(OH, "optimum/habana/transformers/models/mixtral/modeling_mixtral.py",
                                                  "GaudiMixtralSparseMoeBlock")] + TP_SRC),
    "vllm_gaudi_llama": (vllm_llama(), "vllm-gaudi",
                         [_src(VL, "vllm/model_executor/models/llama.py", "LlamaForCausalLM/LlamaAttention/LlamaMLP"),
                          _src(VG, "vllm_gaudi/attention/backends/hpu_attn.py", "HPUAttentionImpl modules"),
                          _src(VG, "vllm_gaudi/extension/utils.py", "Matmul, B2BMatmul, Softmax, VLLMKVCache, "
                               "ModuleFusedSDPA"),
                          _src(VG, "vllm_gaudi/v1/worker/hpu_model_runner.py", "load_model: INC prepare/convert")]),
    "vllm_gaudi_llama_row_chunks": (vllm_llama(row_chunks=True), "vllm-gaudi",
                                    [_src(VG, "vllm_gaudi/ops/hpu_row_parallel_linear.py", "HPURowParallelLinear")]),
}


def main() -> None:
    for stem, (mods, engine, origin) in LISTS.items():
        names = [m[0] for m in mods]
        assert len(names) == len(set(names)), stem
        doc = {"engine": engine, "list": stem, "n_layers": N, "origin": origin, "generator": Path(__file__).name,
               "modules": mods}
        (HERE / f"{stem}.json").write_text(json.dumps(doc, indent=0) + "\n")


if __name__ == "__main__":
    main()
