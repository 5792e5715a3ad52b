"""MLflow model evaluator ``selprune``: forget/retain next-token metrics through ``mlflow.models.evaluate``.

    mlflow.models.evaluate(
        "models:/NAME/VERSION", data=df, model_type="selprune", evaluators=["selprune"],
        evaluator_config={"selprune": {"max_length": 128}},
    )

``data`` is a DataFrame with a text column (``text_column``, default
``text``) and a role column (``role_column``, default ``role``) whose values
are ``forget`` or ``retain``; every row is evaluated (up to ``eval_tokens``
tokens per role). Alternatively ``evaluator_config`` names the two
datasets as DATA specs (``forget``/``retain``: a file, a directory,
``builtin:stdlib-code``, ...) and ``data`` only satisfies MLflow's signature.
With ``parent_model_uri`` in the config, relative drops vs that model are
reported too.
"""

from __future__ import annotations

from mlflow.models.evaluation import EvaluationResult, ModelEvaluator

MODEL_TYPES = ("selprune", "unlearning")


def _hf_components(model):
    """The transformers model and tokenizer inside a pyfunc-loaded transformers model."""
    raw = model.get_raw_model() if hasattr(model, "get_raw_model") else model
    pipeline = getattr(raw, "pipeline", raw)
    hf_model = getattr(pipeline, "model", None)
    tokenizer = getattr(pipeline, "tokenizer", None)
    if hf_model is None or tokenizer is None:
        raise ValueError("the selprune evaluator needs a transformers model logged with its tokenizer")
    return hf_model, tokenizer


def _documents(dataset, config: dict, role: str):
    if config.get(role):
        return config[role]
    frame = dataset.features_data
    text_column = config.get("text_column", "text")
    role_column = config.get("role_column", "role")
    for column in (text_column, role_column):
        if column not in frame.columns:
            raise ValueError(
                f"the evaluation data has no '{column}' column (columns: {list(frame.columns)}); "
                f"give '{text_column}' and '{role_column}' columns or name forget/retain DATA in evaluator_config"
            )
    docs = [str(t) for t in frame.loc[frame[role_column] == role, text_column] if str(t).strip()]
    if not docs:
        raise ValueError(f"the evaluation data has no rows with {role_column} == '{role}'")
    return docs


class SelpruneEvaluator(ModelEvaluator):
    """Forget/retain top1, top10, skip50_top1, loss and perplexity (and drops vs a parent)."""

    @classmethod
    def can_evaluate(cls, *, model_type, evaluator_config, **kwargs) -> bool:
        return model_type in MODEL_TYPES or bool(evaluator_config.get("forget"))

    def evaluate(
        self,
        *,
        model_type,
        dataset,
        run_id,
        evaluator_config,
        model=None,
        extra_metrics=None,
        custom_artifacts=None,
        predictions=None,
        **kwargs,
    ) -> EvaluationResult:
        from mlflow.tracking import MlflowClient

        from mlflow_selprune.config import DataOptions
        from mlflow_selprune.data import prepare_data
        from mlflow_selprune.evaluation.drops import summary_metrics
        from mlflow_selprune.registry.loading import load_components
        from mlflow_selprune.registry.resolve import resolve
        from mlflow_selprune.unlearn import make_evaluate_fn

        if model is None:
            raise ValueError("the selprune evaluator needs a model, not only predictions")
        config = dict(evaluator_config or {})
        hf_model, tokenizer = _hf_components(model)
        options = DataOptions(**{k: config[k] for k in ("max_length", "batch_size", "eval_tokens") if k in config})
        # An evaluator evaluates every row it is given: nothing is held back for statistics.
        prepared = {
            role: prepare_data(_documents(dataset, config, role), tokenizer, options, eval_only=True)
            for role in ("forget", "retain")
        }
        evaluate_fn = make_evaluate_fn(prepared["forget"], prepared["retain"], progress=False)
        metrics = evaluate_fn(hf_model)
        if config.get("parent_model_uri"):
            parent, _ = load_components(resolve(config["parent_model_uri"]))
            metrics = summary_metrics(evaluate_fn(parent), metrics)
        metrics = {k: float(v) for k, v in metrics.items() if v == v}  # NaN: not meaningful, not logged
        client = MlflowClient()
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        return EvaluationResult(metrics=metrics, artifacts={})
