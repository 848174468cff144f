#!/usr/bin/env bash
# The checks that need a CUDA GPU (one is enough), run from the repository root:
#   bash scripts/gpu_check.sh
# 1. tests/test_cuda.py: every schedule with all stages in one process (NCCL), two ranks sharing
#    the GPU over gloo (tensors staged through host memory), weights equal on CPU and GPU;
#    tests/test_cuda_graph.py: steps captured in a CUDA graph (PipelineSpec(cuda_graph=True)) train as eager
#    steps do (losses and weights), for one stage and for looped placements of 2 and 4 stages;
# 2. `conveyor train --device cuda` both ways, to compare with the same runs on CPU, and with bf16, fp16
#    and --dp 2;
# 3. the CUDA cases other test files hold (split backward and dropout replayed by recompute on the GPU, the
#    launcher's backend choice), under that machine's torch (it may be older than the one CI uses); with
#    GPU_CHECK_FULL_SUITE=1, the whole suite (longer than a 15-minute lease of the device allows);
# 4. activation offload on the GPU (pinned host memory, a side stream): tests/test_cuda.py checks it trains like
#    the unsplit model and comes back bit for bit; benchmarks/memory_schedules.py --device cuda measures the bytes
#    held, torch's own peak allocation and the step time with and without it (2 ranks sharing the GPU over gloo;
#    its CPU path is the same script without --device), and `conveyor train --offload all` runs on the GPU.
# Logs go to $OUT (or ./gpu-check); the exit status is 1 if anything failed.
set -uo pipefail
out=${OUT:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))" \
    | tee "$out/versions.txt" || status=1
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/cuda-tests.log" || status=1
python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py 2>&1 | tee "$out/cuda-graph-tests.log" || status=1
# The runtime's own cost on the GPU, eager and with the steps captured (a launch-bound model).
python3 benchmarks/bench_overhead.py --device cuda --rounds 5 --steps 10 2>&1 | tee "$out/bench-overhead-cuda.txt" || status=1
# Then mixed precision on the GPU (bf16, and fp16 with its loss scale), and pp x dp over gloo (2 x 2 ranks
# staging through host memory: NCCL refuses two ranks on one GPU).
for run in "--ranks 2 --schedule zbv" "--ranks 2 --schedule 1f1b" "--ranks 1 --schedule interleaved-1f1b --virtual 2" \
    "--ranks 2 --precision bf16" "--ranks 2 --precision fp16" "--ranks 4 --dp 2" \
    "--ranks 2 --schedule v-half --microbatches 8 --offload all" "--ranks 2 --schedule v-min --microbatches 8"; do
    name=$(echo "$run" | tr -d '-' | tr ' ' '_')
    # shellcheck disable=SC2086  # $run holds several options
    python3 -m conveyor train --device cuda $run --steps 30 --no-progress 2>&1 | tee "$out/train_$name.log" || status=1
done
python3 benchmarks/memory_schedules.py --device cuda --rows 2048 --dim 256 --json "$out/memory-cuda.json" 2>&1 \
    | tee "$out/memory-cuda.log" || status=1
if [ "${GPU_CHECK_FULL_SUITE:-0}" = 1 ]; then
    python3 -m pytest -q -p no:cacheprovider --ignore tests/test_cuda.py --ignore tests/test_cuda_graph.py tests 2>&1 \
        | tee "$out/cpu-tests.log" || status=1
else
    python3 -m pytest -q -p no:cacheprovider tests/test_split_backward.py \
        tests/test_launch.py::test_default_backend_on_cpu_is_gloo 2>&1 | tee "$out/cuda-cases.log" || status=1
fi
exit $status
