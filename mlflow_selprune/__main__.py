"""``python -m mlflow_selprune``: the same CLI as ``mlflow-selprune``."""

from .cli import main

if __name__ == "__main__":
    main()
