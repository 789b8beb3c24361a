#!/usr/bin/env bash
# The GPU checks, in one run on a CUDA machine whose python3 already has torch (the device tool's machines):
#   bash benchmarks/gpu_check.sh OUT_DIR
# Wheels of packages that machine lacks may be in .whl/ (datasets, gguf, rank-bm25, ...). Writes to OUT_DIR:
# test_cuda.log (tests/test_cuda.py), extract_gpu.md (benchmarks/extract_throughput.py on CUDA),
# suite.log (the whole suite with "auto" devices resolving to CUDA), demo.log / demo.json (`dataworth demo`).
set -u
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || { tail "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
echo "== tests/test_cuda.py"
timeout 180 python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider -rs >"$out/test_cuda.log" 2>&1; echo "rc=$?"
tail -n 25 "$out/test_cuda.log"
echo "== extraction throughput on CUDA"
timeout 200 python3 benchmarks/extract_throughput.py --device cuda --models tiny,smollm2-shape --batch 16 --seq 512 \
  --steps 10 >"$out/extract_gpu.md" 2>&1; echo "rc=$?"
cat "$out/extract_gpu.md" | tail -n 12
echo "== demo (default world) and the whole suite, side by side"
( start=$SECONDS; timeout 240 python3 -m dataworth demo --out /tmp/demo --json "$out/demo.json" >"$out/demo.log" 2>&1
  echo "demo rc=$? wall $((SECONDS - start)) s" >>"$out/demo.log" ) &
timeout 240 python3 -m pytest -q -p no:cacheprovider -n 8 >"$out/suite.log" 2>&1; echo "suite rc=$?"
tail -n 30 "$out/suite.log"
wait
tail -n 30 "$out/demo.log"
