#!/usr/bin/env bash
# One short check on a machine with an NVIDIA GPU, in a few minutes (issue 33):
#   1. install with the `gpu` extra (TensorFlow with CUDA) into .venv-gpu and name the card;
#   2. training images per second, float32 against mixed_bfloat16 (random images, the `best`
#      recipe's network and optimiser: benchmarks/precision_speed.py);
#   3. with CIFAR10_URL set (a path or URL of cifar-10-python.tar.gz), a whole `dvc repro` of the
#      `fast` recipe, then 5 epochs of `best` (benchmarks/train_throughput.py).
# params.yaml is put back as it was. Results land in benchmarks/results/gpu_*.json.
#
#   CIFAR10_URL=/data/cifar-10-python.tar.gz benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
export PYTHONUNBUFFERED=1

test -x "$VENV/bin/python" || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --constraint requirements.lock --editable '.[gpu]'
export PATH="$PWD/$VENV/bin:$PATH"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c 'import tensorflow as tf; gpus = tf.config.list_physical_devices("GPU"); print(gpus); assert gpus, "TensorFlow sees no GPU"'

python benchmarks/precision_speed.py --batches 50 --repeats 5 --name gpu_precision_speed

if [ -n "${CIFAR10_URL:-}" ]; then
  cp params.yaml /tmp/gpu_check_params.yaml
  trap 'cp /tmp/gpu_check_params.yaml params.yaml' EXIT
  python -m pipeline.recipe fast
  started=$SECONDS
  dvc repro
  echo "fast recipe, the whole dvc repro: $((SECONDS - started)) s; metrics/test.json: $(cat metrics/test.json)"
  python benchmarks/train_throughput.py --recipe best --epochs 5 --name gpu_train_throughput
fi
