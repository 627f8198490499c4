#!/usr/bin/env bash
# The GPU host in one command: the GPU tests (`pytest -m gpu`), then the benchmarks. Logs and JSON go to $OUT.
#   scripts/gpu_run.sh                # tests kernel convert (the default steps)
#   scripts/gpu_run.sh tests          # only the steps named, in order:
#     tests      pytest -m gpu (every test module with GPU tests): bit-exactness, pass/fail
#     kernel     bench_kernel.py (dequant kernel, with and without PDL), bench_kernel_quant.py, bench_mxfp4.py
#     convert    bench_convert.py from /dev/shm: 1 and 2 MoE layers of EXPERTS (256) experts, steady state and
#                fixed cost, dsv3conv profiled per stage (needs ~75 GB there with 256 experts)
#     disk       bench_convert.py on the local disk (DISK_DIR, default /tmp/dsv3conv-disk): 1 and 2 MoE layers of
#                EXPERTS=128 experts in SHARD_GB=1 GB shards (~36 GB of disk at most), the input pushed out of the
#                page cache before each step (--cold: drop_caches or fadvise, whichever is seen to work; the log
#                says which, with the re-read times that show it), one GPU, no eager converter
#     sweep      bench_convert.py from /dev/shm, 2 MoE layers (EXPERTS=128, SHARD_GB=1): dsv3conv --device cuda at
#                every SWEEP_READERS ("2 4") x SWEEP_WRITERS ("4 8 12 16") reader and writer thread counts on the
#                same files: engine seconds and its rate against the overlap bound, per setting; then on the
#                same files, the default run against DSV3CONV_STAND_IN=1 (the CPU converts while the GPU starts)
#     scale      bench_convert.py from /dev/shm on every GPU: threads, processes, --part jobs, two on one GPU
#     engine     the asynchronous GPU engine in one go: its GPU tests, bench_convert.py from /dev/shm (one GPU,
#                one GPU writing through mappings, every GPU in one process, one --part job per GPU;
#                EXPERTS=128, shards of SHARD_GB=1 GB as many output files as a real release has in flight),
#                and three --dry-run of the 163-shard replica
#     pdl        bench_kernel.py --pdl-sweep: small-tensor configs x PDL modes
#     quant-e2e  bench_quant_convert.py: quant --device cpu against --device cuda on the same files
#     write      bench_write.py: N writer threads of one process against N processes on /dev/shm
#     verify     verify --against through the engine: its GPU tests (the CUDA report is the CPU's), then
#                bench_verify.py from /dev/shm on cuda and on cpu (2 layers of VERIFY_EXPERTS, default 32, experts)
#     cpu        the CPU path with the GPUs hidden (on CPUS, default all cores): bench_cpu_kernels.py (numba
#                and torch kernels at 1..all threads), then bench_cpu.py from /dev/shm (CPU_GB GB, default 2)
# Exit status: 1 if the tests failed or a benchmark could not run; the other steps still run.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
nproc; free -g | head -2
status=0
run() {  # run STEP-LOG COMMAND...: output to the terminal and $OUT/STEP-LOG; remember a failure
  local log=$1; shift
  "$@" 2>&1 | tee "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "!!! $* exited with $rc"; status=1; }
}
for step in "${@:-tests kernel convert}"; do for step in $step; do
  echo "=== $step $(date +%T)"
  case "$step" in
    tests)  # only the modules holding GPU tests are collected: the host needs no other test dependency
      run test_gpu.log python3 -m pytest -q -p no:cacheprovider -m gpu --durations=10 \
        $(grep -l "pytest.mark.gpu" tests/test_*.py) ;;
    kernel)
      run bench_kernel.log python3 scripts/bench_kernel.py --json "$OUT/bench_kernel.json"
      run bench_kernel_quant.log python3 scripts/bench_kernel_quant.py --json "$OUT/bench_kernel_quant.json"
      run bench_mxfp4.log python3 scripts/bench_mxfp4.py --json "$OUT/bench_mxfp4.json" ;;
    convert)
      run bench_tmpfs.txt python3 scripts/bench_convert.py --device cuda --experts "${EXPERTS:-256}" \
        --dir /dev/shm/dsv3conv-bench --out "$OUT/convert-tmpfs" ;;
    disk)
      d=${DISK_DIR:-/tmp/dsv3conv-disk}; mkdir -p "$d"; df -hT "$d" /dev/shm
      run bench_disk.txt python3 scripts/bench_convert.py --device cuda --experts "${EXPERTS:-128}" \
        --shard-gb "${SHARD_GB:-1}" --layers 1 2 --cold --skip-eager --skip-single-dd --dir "$d" \
        --out "$OUT/convert-disk"
      rm -rf "$d" ;;
    sweep)
      io=(); for r in ${SWEEP_READERS:-2 4}; do for w in ${SWEEP_WRITERS:-4 8 12 16}; do io+=(--io "$r:$w"); done; done
      run bench_sweep.txt python3 scripts/bench_convert.py --device cuda "${io[@]}" --skip-eager --skip-single-dd \
        --experts "${EXPERTS:-128}" --shard-gb "${SHARD_GB:-1}" --layers 2 --dir /dev/shm/dsv3conv-sweep \
        --out "$OUT/convert-sweep" --keep
      run bench_standin.txt python3 scripts/bench_convert.py --device cuda --device standin:cuda --skip-eager \
        --skip-single-dd --experts "${EXPERTS:-128}" --shard-gb "${SHARD_GB:-1}" --layers 2 \
        --dir /dev/shm/dsv3conv-sweep --out "$OUT/convert-standin"
      rm -rf /dev/shm/dsv3conv-sweep ;;
    scale)
      n=$(nvidia-smi -L | wc -l); all=$(seq -s, -f "cuda:%g" 0 $((n - 1)))
      run bench_scale.txt python3 scripts/bench_convert.py --device cuda --device cuda:all --device processes:cuda:all \
        --device "parts:$all" --device cuda:0,cuda:0 --skip-eager --experts "${EXPERTS:-128}" \
        --dir /dev/shm/dsv3conv-scale --out "$OUT/convert-scale" ;;
    verify)
      run test_gpu_verify.log python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_verify.py tests/test_verify_v4.py
      for dev in cuda cpu; do
        rm -rf /dev/shm/dsv3conv-verify
        run "bench_verify_$dev.txt" python3 scripts/bench_verify.py --device "$dev" --experts "${VERIFY_EXPERTS:-32}" \
          --dir /dev/shm/dsv3conv-verify
      done
      rm -rf /dev/shm/dsv3conv-verify ;;
    engine)
      run test_gpu_engine.log python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_engine.py tests/test_gpu.py
      n=$(nvidia-smi -L | wc -l); all=$(seq -s, -f "cuda:%g" 0 $((n - 1)))
      run bench_engine.txt python3 scripts/bench_convert.py --device cuda --device mapped:cuda --device cuda:all \
        --device "parts:$all" --skip-eager --experts "${EXPERTS:-128}" --shard-gb "${SHARD_GB:-1}" --layers 1 2 \
        --dir /dev/shm/dsv3conv-engine --out "$OUT/convert-engine"
      R=/dev/shm/dsv3conv-replica; rm -rf "$R" "$R-out"
      run dry_run.txt bash -c "python3 -m dsv3conv example replica $R >/dev/null && TIMEFORMAT='dry run %R s' && \
        for i in 1 2 3; do time python3 -m dsv3conv dequant $R $R-out --dry-run --no-space-check >/dev/null; done"
      rm -rf "$R" ;;
    pdl)
      run bench_pdl.log python3 scripts/bench_kernel.py --pdl-sweep --json "$OUT/bench_pdl.json" ;;
    quant-e2e)
      run bench_quant_e2e.txt python3 scripts/bench_quant_convert.py --device cpu --device cuda --gb "${QGB:-6}" \
        --dir /dev/shm/dsv3conv-qbench --json "$OUT/bench_quant_e2e.json" ;;
    cpu)
      pin=(); [ -n "${CPUS:-}" ] && pin=(taskset -c "$CPUS")
      run bench_cpu_kernels.txt env CUDA_VISIBLE_DEVICES= "${pin[@]}" python3 scripts/bench_cpu_kernels.py \
        --json "$OUT/bench_cpu_kernels.json"
      run bench_cpu.txt env CUDA_VISIBLE_DEVICES= "${pin[@]}" python3 scripts/bench_cpu.py --gb "${CPU_GB:-2}" \
        --dir /dev/shm/dsv3conv-cpu --out "$OUT/cpu" ;;
    write)
      run bench_write.txt python3 scripts/bench_write.py --dir /dev/shm/dsv3conv-wtest --gb 16 --workers 1 2 4 8 ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done; done
echo "=== done $(date +%T), status $status"
exit $status
