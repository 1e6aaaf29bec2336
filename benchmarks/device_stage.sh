#!/usr/bin/env bash
# Builds, on this machine, what benchmarks/device_h100.sh carries to a lent GPU machine (which reaches no registry and
# takes at most 64 MiB per call): .dev/w (wheels the GPU image lacks), .dev/a and .dev/b (the default model's GGUF in
# two parts, the Wikipedia sample as a text file of the same documents, SmolLM2's tokenizer, and the peers' fp8 plans
# from `bench_peers.py --peers-only`). .dev/ is git-ignored through .git/info/exclude.
# Usage: bash benchmarks/device_stage.sh [python-with-the-bench-extra]   (default .venv-bench/bin/python)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=.venv/bin/python
BENCH_PY=${1:-.venv-bench/bin/python}
grep -qx '/.dev/' "$(git rev-parse --git-common-dir)/info/exclude" 2>/dev/null || echo '/.dev/' >> "$(git rev-parse --git-common-dir)/info/exclude"
rm -rf .dev && mkdir -p .dev/w .dev/a .dev/b
# the GPU image has torch, transformers, numpy, networkx, psutil, py-cpuinfo, pyyaml, requests, tqdm; these it lacks
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d .dev/w \
  pyomo==6.10.1 highspy==1.16.0 gguf==0.19.0 neural-compressor-pt==3.10 torchao==0.18.0 prettytable==3.18.0 \
  wcwidth==0.9.4 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 annotated-doc==0.0.7 \
  typing-inspection==0.4.5
GGUF=$($PY -c "from inc_ipamp.models import gguf_path; print(gguf_path())")
head -c 42500000 "$GGUF" > .dev/a/gguf.part1
tail -c +42500001 "$GGUF" > .dev/b/gguf.part2
$PY - <<'EOF'
import gzip, shutil
from inc_ipamp.data import wiki_documents
from inc_ipamp.models import default_model_dir
with gzip.open(".dev/a/wiki.txt.gz", "wt", encoding="utf-8") as f:  # read back with --data: the same blocks
    f.write("\n\n".join(wiki_documents()) + "\n")
d = default_model_dir()
with open(d / "tokenizer.json", "rb") as src, gzip.open(".dev/a/tokenizer.json.gz", "wb") as dst:
    shutil.copyfileobj(src, dst)
shutil.copy(d / "tokenizer_config.json", ".dev/a/")
EOF
PYTHONPATH="$ROOT" $BENCH_PY benchmarks/bench_peers.py --tracks fp8 --peers-only .dev/b/peer_plans.json
du -sb .dev/* | awk '{printf "%s %.1f MB\n", $2, $1 / 1e6}'
echo "then: device run 1 carries .dev/w and .dev/a (device_h100.sh smoke|stage), run 2 carries .dev/b (… full)"
