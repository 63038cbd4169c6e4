"""CIFAR-10 experiment pipeline: DVC stages, MLflow tracking, Optuna sweeps."""
