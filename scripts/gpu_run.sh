#!/usr/bin/env bash
# One call on a GPU box: install, then each step named (in order). Logs and JSON go to $OUT.
#   scripts/gpu_run.sh tmpfs   # GPU tests + bench_convert from /dev/shm (1 GPU)
#   scripts/gpu_run.sh disk    # bench_convert on the local disk, page cache dropped before each run
#   scripts/gpu_run.sh quant   # quant: the CUDA path stage by stage (gpu_quant_probe), kernel bit-exactness + speed
#   scripts/gpu_run.sh kernel  # dequant kernel: bit-exactness (gpu_check) and bench_kernel (with and without PDL)
#   scripts/gpu_run.sh pdl     # bench_kernel --pdl-sweep: small-tensor configs x PDL modes, back to back
#   scripts/gpu_run.sh scale   # bench_convert from /dev/shm: one GPU, every GPU (--device cuda:all as threads,
#                              # as processes, as separate --part jobs), two workers on one GPU (cuda:0,cuda:0)
#   scripts/gpu_run.sh tests   # tests/test_gpu.py
#   scripts/gpu_run.sh quant-e2e  # bench_quant_convert: quant --device cpu against --device cuda, same files
#   scripts/gpu_run.sh write   # bench_write: N writer threads of one process against N processes on /dev/shm
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/install.log 2>&1 || { cat /tmp/install.log; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
nproc; free -g | head -2
for step in "${@:-tmpfs}"; do
  echo "=== $step $(date +%T)"
  case "$step" in
    tmpfs)
      python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" | tail -5
      python3 scripts/bench_convert.py --device cuda --gb "${GB:-20}" --dir /dev/shm/dsv3conv-bench \
        --json "$OUT/bench_tmpfs.json" 2>&1 | tee "$OUT/bench_tmpfs.txt"
      ;;
    disk)
      python3 scripts/bench_convert.py --device cuda --gb "${GB:-16}" --dir /tmp/dsv3conv-bench --cold \
        --json "$OUT/bench_disk.json" 2>&1 | tee "$OUT/bench_disk.txt"
      ;;
    quant)
      timeout 300 python3 scripts/gpu_quant_probe.py 2>&1 | tee "$OUT/quant_probe.log"
      timeout 300 python3 -X faulthandler scripts/gpu_check_quant.py --no-pipeline --repeat 10 2>&1 \
        | tee "$OUT/gpu_check_quant.log" | tail -20
      ;;
    kernel)
      python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "chained or batch_of_shapes" 2>&1 | tail -3
      timeout 300 python3 scripts/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log" | tail -4
      timeout 300 python3 scripts/bench_kernel.py --json "$OUT/bench_kernel.json" 2>&1 | tee "$OUT/bench_kernel.log" | tail -16
      ;;
    pdl)
      timeout 300 python3 scripts/bench_kernel.py --pdl-sweep --json "$OUT/bench_pdl.json" 2>&1 | tee "$OUT/bench_pdl.log" | tail -26
      ;;
    quant-compiled)
      timeout 300 python3 scripts/gpu_quant_probe.py --stages cpu-compiled,pipeline-compiled 2>&1 | tee "$OUT/quant_probe2.log"
      ;;
    tests)
      python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" | tail -5
      ;;
    quant-e2e)
      python3 scripts/bench_quant_convert.py --device cpu --device cuda --gb "${QGB:-6}" --dir /dev/shm/dsv3conv-qbench \
        --json "$OUT/bench_quant_e2e.json" 2>&1 | tee "$OUT/bench_quant_e2e.txt"
      ;;
    write)
      python3 scripts/bench_write.py --dir /dev/shm/dsv3conv-wtest --gb 16 --workers 1 2 4 8 2>&1 | tee "$OUT/bench_write.txt"
      ;;
    scale)
      n=$(nvidia-smi -L | wc -l); all=$(seq -s, -f "cuda:%g" 0 $((n - 1)))
      devs=(--device cuda --device cuda:all --device processes:cuda:all --device "parts:$all" --device cuda:0,cuda:0)
      python3 scripts/bench_convert.py "${devs[@]}" --parallel-io "$n" \
        --skip-eager --gb "${GB:-20}" --dir /dev/shm/dsv3conv-scale --json "$OUT/bench_scale.json" 2>&1 \
        | tee "$OUT/bench_scale.txt"
      ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
echo "=== done $(date +%T)"
