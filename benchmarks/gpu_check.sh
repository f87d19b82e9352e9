#!/usr/bin/env bash
# The one prepared device check (benchmarks/gpu_check.py): run from the repository root on a CUDA machine.
#   bash benchmarks/gpu_check.sh [extra gpu_check.py flags]       # results in benchmarks/results/gpu_check/
# It needs torch with CUDA, timm >= 1.0.31, huggingface_hub, safetensors, pillow, numpy and pytest. Where timm is
# older and nothing can be downloaded, carry wheels in .whl/ (see /work/.library/device/README.md in this
# workplace): they are installed into /tmp/site first. The whole run stays under 10 minutes (timeout below).
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)"
timeout 570 python3 benchmarks/gpu_check.py --device cuda "$@"
