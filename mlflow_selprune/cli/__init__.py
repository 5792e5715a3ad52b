"""The ``mlflow-selprune`` command line, one module per command group (as MLflow's own ``cli``).

Exit codes: 0 success, 1 gate failed (or ``lineage --verify``/``--all`` found tampering, or something does not
comply with a policy), 2 bad input (one line on stderr saying what is wrong and what to do; nothing is written to
the registry), 3 unexpected error. ``common`` holds the ``main`` group and what every group shares; ``unlearning``
(prune, evaluate, demo), ``registry`` (register, gate, lineage, materialize, export, keygen), ``policies`` (policy,
reconcile, status, history) and ``webhooks`` add their commands to it.
"""

from . import policies, registry, unlearning, webhooks  # noqa: F401 - each adds its commands to main
from .common import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
