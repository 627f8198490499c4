#!/usr/bin/env bash
# One call on a GPU box: install, prove the CUDA pipeline bit-exact, then benchmark end to end.
#   scripts/gpu_run.sh tmpfs   # tests + bench_convert from /dev/shm
#   scripts/gpu_run.sh disk    # bench_convert on the local disk, page cache dropped before each run
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
case "${1:-tmpfs}" in
  tmpfs)
    python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" | tail -5
    python3 scripts/bench_convert.py --device cuda --gb "${GB:-20}" --dir /dev/shm/dsv3conv-bench \
      --json "$OUT/bench_tmpfs.json" 2>&1 | tee "$OUT/bench_tmpfs.txt"
    ;;
  disk)
    [ -f scripts/gpu_check_quant.py ] && python3 scripts/gpu_check_quant.py 2>&1 | tee "$OUT/gpu_check_quant.log" | tail -25
    python3 scripts/bench_convert.py --device cuda --gb "${GB:-16}" --dir /tmp/dsv3conv-bench --cold \
      --json "$OUT/bench_disk.json" 2>&1 | tee "$OUT/bench_disk.txt"
    ;;
esac
