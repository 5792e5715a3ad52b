"""mlflow-selprune: machine unlearning by selective pruning, as an MLflow plugin."""
__version__ = "0.1.0"
