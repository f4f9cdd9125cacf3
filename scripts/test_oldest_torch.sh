#!/usr/bin/env bash
# The oldest supported torch/torchvision pair (pyproject.toml's lower bounds) in a virtual environment
# of its own (.venv-oldest): the fast tests that depend on torch (those marked any_torch check configs,
# command lines and scripts' output, the same under any torch, and run with the newest); the fused
# attention's kernels compiled by this torch's inductor against the reference (one block shape, training
# and evaluation); then a short train.py run with the default CBAM, which must take the fused path (its
# kernels op by op there: compiling them is the test before's).
#   bash scripts/test_oldest_torch.sh            # install, then test
#   bash scripts/test_oldest_torch.sh install    # the environment alone (.ci/run builds it beside the other)
#   bash scripts/test_oldest_torch.sh test       # the tests, in the environment built before
set -euo pipefail
cd "$(dirname "$0")/.."
step=${1:-all}
torch=2.4.1 torchvision=0.19.1  # keep equal to the lower bounds in pyproject.toml
if [ "$step" != test ]; then
  python3 -m venv .venv-oldest
  .venv-oldest/bin/pip install -q -e ".[dev]" "torch==$torch" "torchvision==$torchvision"
fi
[ "$step" = install ] && exit 0
.venv-oldest/bin/python -c "import torch, torchvision; print('oldest supported: torch', torch.__version__, \
'torchvision', torchvision.__version__)"
# its own temporary folder and no pytest cache: .ci/run runs it beside the newest torch's pytest
.venv-oldest/bin/python -m pytest -q -m "not slow and not any_torch" -p no:cacheprovider --basetemp="$(mktemp -d)"
.venv-oldest/bin/python -m pytest -q -p no:cacheprovider --basetemp="$(mktemp -d)" \
  "tests/test_fused.py::test_compiled_kernels_match_reference[cbam]"
run=$(mktemp -d)
CBAM_FUSED_KERNELS=eager .venv-oldest/bin/python train.py experiment=smoke trainer.epochs=1 \
  trainer.limit_train_batches=4 "hydra.run.dir=$run" trainer.device=cpu >"$run/console.log" 2>&1 \
  || { cat "$run/console.log"; exit 1; }
.venv-oldest/bin/python - "$run" <<'PY'
import json, sys
settings = json.load(open(f"{sys.argv[1]}/results.json"))["settings"]
assert settings["attention_impl"] == "fused", f"the default CBAM fell back to the reference: {settings}"
print("train.py with the default CBAM:", settings)
PY
rm -rf "$run"
