"""CIFAR-10 experiment pipeline: DVC stages, MLflow tracking, Optuna sweeps."""

import os

# TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notices) hides the pipeline's own log;
# warnings and errors still show. Set before any module imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
