"""CIFAR-10 experiment pipeline: DVC stages, MLflow tracking, Optuna sweeps."""

import os

# TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notices) hides the pipeline's own log;
# warnings and errors still show. Set before any module imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# MLflow's usage telemetry has a thread that sets and unsets an environment variable, and an HTTP
# request that reads os.environ meanwhile fails with KeyError: 2 of 32 sweep workers stopped so
# (benchmarks/sweep_scale.py). The pipeline sends none; MLFLOW_DISABLE_TELEMETRY=false sends it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
