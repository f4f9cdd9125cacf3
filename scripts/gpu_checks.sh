#!/usr/bin/env bash
# GPU checks in one run (a few minutes on an H100/H200): the CUDA tests (inductor's Triton kernels
# against the reference, bf16 autocast), then both benchmarks with bf16 AMP and channels_last.
# Each step's log goes to ${OUT:-gpu-checks}/; the exit status is non-zero if any step failed. The
# steps' time limits add up to 570 s, so that the whole run fits in one 10-minute command.
#
#   bash scripts/gpu_checks.sh            # with this project installed (README), or a Python that has
#                                         # torch, torchvision, timm, tensorboard, hydra-core, omegaconf
#
# On an offline machine whose Python lacks hydra-core and omegaconf, and has no Fashion-MNIST (the
# quickstart data of bench_train.py), prepare .gpu/ (git ignores it) where pip and the data work:
#   python3 -m pip wheel --no-deps -w .gpu/wheels hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
#   cp -r /usr/share/datasets/fashion-mnist .gpu/fashion-mnist
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-checks}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-checks-site .gpu/wheels/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/gpu-checks-site"
fi
data=()
if [ -d .gpu/fashion-mnist ]; then data=("data.root=$PWD/.gpu/fashion-mnist"); fi

failed=()
step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log to $out/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  if ! timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"; then
    echo "!! $name failed or ran past ${limit}s"
    failed+=("$name")
  fi
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$py" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
} 2>&1 | tee "$out/gpu.txt"
step tests 150 "$py" -m pytest -q -rs -m cuda -p no:cacheprovider tests/test_fused.py
step bench_attention 270 "$py" scripts/bench_attention.py --device cuda --amp bf16 --channels-last --batch 64 --reps 51
step bench_train 150 "$py" scripts/bench_train.py --steps 200 -- trainer.device=cuda trainer.amp=bf16 "${data[@]}"

if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "all GPU checks passed"
