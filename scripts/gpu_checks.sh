#!/usr/bin/env bash
# The GPU check in one command (at most about 6 minutes on an H100/H200): scripts/gpu_checks.py's steps, each
# under a hard time limit, every figure in ${OUT:-gpu-checks}/gpu_checks.json and each step's log beside it.
# The exit status is non-zero if any step failed or ran out of time.
#
#   bash scripts/gpu_checks.sh          # with this project installed (README), or a Python that has torch,
#                                       # torchvision, timm, tensorboard, hydra-core and omegaconf
#   bash scripts/gpu_checks.sh --cpu    # the same steps at toy sizes on the CPU (tests/test_gpu_checks.py)
#
# On an offline machine whose Python lacks hydra-core and omegaconf, and has no Fashion-MNIST (the
# quickstart's data), prepare .gpu/ (git ignores it) where pip and the data work:
#   python3 -m pip wheel --no-deps -w .gpu/wheels hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
#   cp -r /usr/share/datasets/fashion-mnist .gpu/fashion-mnist
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-checks}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
  site=$(mktemp -d)
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" .gpu/wheels/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$site"
fi
data=()
if [ -d .gpu/fashion-mnist ]; then data=(--data-root "$PWD/.gpu/fashion-mnist"); fi

# The default plan's own limits add up to 360 s on CUDA; this one is the backstop (SIGKILL 5 s after SIGTERM).
# With the opt-in steps raise it: GPU_CHECKS_LIMIT=900 bash scripts/gpu_checks.sh --steps quickstart train_step
# ddp_step input (the input's measurement adds up to 450 s).
timeout -k 5 ${GPU_CHECKS_LIMIT:-390} "$py" scripts/gpu_checks.py --out "$out" "${data[@]}" "$@"
