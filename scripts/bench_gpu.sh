#!/usr/bin/env bash
# The GPU half of the README's Speed section: the CUDA correctness tests of the compiled Triton
# kernels, the operator benchmark and the whole-step benchmark. Run from anywhere:
#     scripts/bench_gpu.sh [test|ops|models|fp16|all]
# Each part fits one 10-minute device call. On an H100 the tests took about 6 minutes (each new shape
# and dtype is autotuned; the fused generator's tests add an estimated 2). The operator benchmark is
# estimated at 6 on an H200 (not yet run since the fused generator). `models` prints the whole-step
# table (RedNet-26, RedNet-50 and ResNet-50 in NCHW and channels_last, eager and compiled) and
# RedNet-26's kernel time by kind; its --budget-s starts no new setup after 5 minutes, so that the
# part ends within 8 even when compilation is slow. Read it against `python scripts/roofline.py` (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# RedNet-26 stage shapes at batch 64 and 224 px: the stride-1 involutions, then the stride-2
# first block of stages 2-4 (its input size is the previous stage's).
STAGES=64x64x56,64x128x28,64x256x14,64x512x7
DOWN=64x128x56,64x256x28,64x512x14
MODELS="rednet26 rednet50 resnet50 tv_resnet50"
what=${1:-all}
run() { [[ $what == "$1" || $what == all ]]; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if run test; then
    $PY -m pytest -q -p no:cacheprovider tests/test_ops_cuda.py
fi
if run ops; then (
    # Issue 12's measurements, bf16, RedNet-26's involution layers at batch 128 (7 distinct shapes):
    # every kernel against its floor with a copy for the bandwidth, the fused generator against the
    # unfused layer, then a whole training step with and without it (peak memory). Autotuning
    # compiles about 160 kernel variants (about a second each) the first time; the tuned choices
    # are cached on disk and shared by the runs (in this subshell only). Estimates on an H200:
    # 4 minutes for these three, 2 for the rest.
    export TRITON_CACHE_AUTOTUNING=1
    $PY scripts/bench_involution.py --device cuda --table kernels --shapes rednet26 --batch-size 128 --dtypes bf16
    $PY scripts/bench_involution.py --device cuda --table layer --shapes rednet26 --batch-size 128 --dtypes bf16
    $PY scripts/bench_involution.py --device cuda --table model --model rednet26 --batch-size 128 --repeats 20 \
        --warmup 5
    # The operator against unfold and shift (the README's table; fp32 and fp16 rows: --dtypes).
    $PY scripts/bench_involution.py --device cuda --shapes $STAGES --dtypes bf16 --impls triton,shift,unfold \
        --repeats 50 --warmup 5
    $PY scripts/bench_involution.py --device cuda --shapes $DOWN --stride 2 --dtypes bf16 \
        --impls triton,shift,unfold --repeats 50 --warmup 5
    # channels_last: the kernels read it through its strides; compare with the NCHW bf16 rows.
    $PY scripts/bench_involution.py --device cuda --shapes $STAGES --channels-last --dtypes bf16 \
        --impls triton,unfold --repeats 50 --warmup 5
) fi
if run models; then
    $PY scripts/bench_models.py --device cuda --amp bf16 --batch-size 128 --models rednet26 rednet50 tv_resnet50 \
        --layouts nchw channels_last --modes eager compile --repeats 20 --warmup 5 --budget-s 300 --profile
fi
if run fp16; then
    # PyTorch's own NCHW BatchNorm kernels (which bf16 gets) run one block per channel, so the
    # kernel generators' 8-64-channel BatchNorms use few SMs; fp16 may get cuDNN's instead.
    $PY scripts/bench_models.py --device cuda --amp fp16 --batch-size 128 --models rednet26 tv_resnet50 \
        --layouts nchw channels_last --repeats 20 --warmup 5 --profile
fi
