"""The MLflow side: resolve and load registry models (``resolve``, ``loading``), the ``selprune`` flavor,
the lineage tag schema and audit chain, the deployment gate, and run logging (``tracking``)."""
