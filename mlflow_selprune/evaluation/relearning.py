"""The relearning check: do a few fine-tuning steps on forget documents bring the capability back?

The unlearned model, its parent and the random control are fine-tuned the same way (the same forget collect
documents in the same seeded order, the same steps, learning rate and batch size), and each one's forget
top-1 on the eval split is measured along the way (``--relearn-curve``). Every change is put on one scale,
the top-1 that unlearning removed (``parent - unlearned`` before fine-tuning):

- ``relearn_recovery``: the unlearned model's gain, the share of the removed top-1 regained;
- ``relearn_control_recovery``: the control's gain over the same fine-tuning, on that scale. The control lost
  next to nothing, so its gain is what such fine-tuning gives any model: a recovery far above it is
  relearning, one near it is adaptation to the documents;
- ``relearn_parent_recovery``: the parent's own change on that scale (negative where the fine-tuning cost it).

Each is NaN where unlearning removed under 5% of the parent's top-1 (``drops.RECOVERY_GAP_FLOOR``).
"""

from __future__ import annotations

from .drops import relearn_recovery

# the models of the check, in the order they are fine-tuned, and the prefix of their metrics
MODELS = {"unlearned": "", "parent": "parent_", "control": "control_"}


def relearning_curve(forget_only, models: dict, batches: list[dict], start: dict, points, settings: dict) -> dict:
    """``{"steps": [...], "forget_top1": {name: [...]}}`` for each of ``models`` (``{name: (model, view)}``,
    ``view`` a context manager that turns ``model`` into that one), fine-tuned on ``batches`` with
    ``settings`` (``engine.relearn``'s keywords) and measured by ``forget_only`` at each of ``points``.
    ``start[name]``: its forget top-1 as it is, already measured (step 0)."""
    from ..engine import relearn

    curve: dict = {"steps": list(points), "forget_top1": {}}
    for name in MODELS:
        if name not in models:
            continue
        model, view = models[name]
        values = {0: start[name]}

        def measure(step, tuned, values=values):
            if step:
                values[step] = forget_only(tuned)["forget_top1"]

        with view():
            relearn(model, batches, measure_at=tuple(points), measure=measure, **settings)
        curve["forget_top1"][name] = [values[step] for step in points]
    return curve


def curve_history(curve: dict) -> list[tuple[int, dict]]:
    """``(step, metrics)`` for each point: ``relearn_curve_{,parent_,control_}{forget_top1,recovery}``,
    MLflow step metrics of the curve (apart from the summary's names, logged at the pruning's last step)."""
    return [(step, _at(curve, i, "relearn_curve_")) for i, step in enumerate(curve["steps"])]


def curve_metrics(curve: dict) -> dict:
    """The curve's last point: ``relearn_{,parent_,control_}{forget_top1,recovery}``."""
    return _at(curve, len(curve["steps"]) - 1, "relearn_")


def _at(curve: dict, i: int, prefix: str) -> dict:
    top1 = curve["forget_top1"]
    out = {f"{prefix}{MODELS[name]}forget_top1": values[i] for name, values in top1.items()}
    if "parent" in top1:
        parent, unlearned = top1["parent"][0], top1["unlearned"][0]
        for name, values in top1.items():
            out[f"{prefix}{MODELS[name]}recovery"] = relearn_recovery(
                parent, unlearned, unlearned + values[i] - values[0]
            )
    return out
