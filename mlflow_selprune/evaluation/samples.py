"""Behaviour before and after, as a person reads it: what the parent, the unlearned model and the random control
answer on the same eval examples of each side.

Each model kind says what an example and an answer are (``ModelKind.sample_rows``, ``prompt_text``,
``respond``): a causal LM continues the first half of a document greedily, a masked LM fills a masked position
(top 5), a classifier names its predicted class. The rows are drawn with a seed from each side's *eval* part.
The table is logged with ``mlflow.log_table`` as ``selprune/samples.json``, so the run's artifact view shows
side | prompt | parent | unlearned | control side by side (an image classifier's rows carry the image too: MLflow
stores each one beside the table and shows it in the table view).
"""

from __future__ import annotations

SAMPLES_ARTIFACT = "selprune/samples.json"


def sample_table(
    model, prepared: dict, preprocessor, *, n: int, seed: int, max_new_tokens: int, parent_view, control_view=None
) -> dict[str, list[str]]:
    """``{"side", "prompt", "parent", "unlearned", "control"}`` columns. ``prepared``: side -> prepared data;
    ``parent_view``/``control_view``: context managers that turn ``model`` into the parent / the control."""
    from ..kinds import kind_of

    kind = kind_of(model)
    table: dict[str, list] = {"side": [], "prompt": [], "image": [], "parent": [], "unlearned": [], "control": []}
    for side, data in prepared.items():
        masking = getattr(data, "masking", None)
        rows = kind.sample_rows(data.eval_batches, n, seed)
        table["side"] += [side] * len(rows)
        table["prompt"] += [kind.prompt_text(row, preprocessor, masking) for row in rows]
        table["image"] += [kind.sample_image(row, preprocessor) for row in rows]
        table["unlearned"] += kind.respond(model, rows, preprocessor, masking, max_new_tokens)
        with parent_view():
            table["parent"] += kind.respond(model, rows, preprocessor, masking, max_new_tokens)
        if control_view is not None:
            with control_view():
                table["control"] += kind.respond(model, rows, preprocessor, masking, max_new_tokens)
        else:
            table["control"] += ["(no control)"] * len(rows)
    if not any(image is not None for image in table["image"]):
        del table["image"]  # a text kind: no picture column
    return table
