#!/usr/bin/env bash
# The oldest supported torch/torchvision pair (pyproject.toml's lower bounds) in a virtual environment
# of its own (.venv-oldest): the fast tests that depend on torch (those marked any_torch check configs,
# command lines and scripts' output, the same under any torch, and run with the newest), then a short
# train.py run with the default CBAM, which must run the fused attention with its kernels compiled (not
# the fallback to the reference).
set -euo pipefail
cd "$(dirname "$0")/.."
torch=2.4.1 torchvision=0.19.1  # keep equal to the lower bounds in pyproject.toml
python3 -m venv .venv-oldest
.venv-oldest/bin/pip install -q -e ".[dev]" "torch==$torch" "torchvision==$torchvision"
.venv-oldest/bin/python -c "import torch, torchvision; print('oldest supported: torch', torch.__version__, \
'torchvision', torchvision.__version__)"
.venv-oldest/bin/python -m pytest -q -m "not slow and not any_torch"
run=$(mktemp -d)
.venv-oldest/bin/python train.py experiment=smoke "hydra.run.dir=$run" trainer.device=cpu >"$run/console.log" 2>&1 \
  || { cat "$run/console.log"; exit 1; }
.venv-oldest/bin/python - "$run" <<'EOF'
import json, sys
settings = json.load(open(f"{sys.argv[1]}/results.json"))["settings"]
assert settings["attention_impl"] == "fused", f"the default CBAM fell back to the reference: {settings}"
print("train.py with the default CBAM:", settings)
EOF
rm -rf "$run"
