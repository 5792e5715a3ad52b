"""Class labels of a classifier's DATA in the model's numbering, and ``--forget-classes`` resolved against them.

Shared by image classifiers and text classifiers: a label column holds class
ids, class names the model knows (``label2id``), or a ``ClassLabel``.
"""

from __future__ import annotations

import re

import datasets

from .sources import DataError


def label_ids(
    dataset: datasets.Dataset, spec: str, label_column: str, model_config
) -> tuple[list[int], list[str] | None]:
    """Every row's class id, and the dataset's class names when it has them (a ClassLabel column)."""
    feature = dataset.features[label_column]
    values = dataset[label_column]
    n_labels = int(getattr(model_config, "num_labels", 0) or 0)
    if isinstance(feature, datasets.ClassLabel):
        ids, names = class_label_ids(values, list(feature.names), spec, model_config)
    elif getattr(feature, "dtype", None) in ("string", "large_string"):
        label2id = {str(k): int(v) for k, v in (getattr(model_config, "label2id", None) or {}).items()}
        unknown = sorted({v for v in values if v not in label2id})
        if unknown:
            raise DataError(
                f"--label-column: DATA {spec!r} has labels the model does not know: "
                f"{', '.join(map(repr, unknown[:5]))}; the model's classes: {', '.join(label2id) or '(none)'}"
            )
        ids, names = [label2id[v] for v in values], None
    elif getattr(feature, "dtype", "").startswith(("int", "uint")):
        ids, names = [int(v) for v in values], None
    else:
        raise DataError(
            f"--label-column: column {label_column!r} of DATA {spec!r} holds {feature}, not class ids or names"
        )
    bad = sorted({i for i in ids if i < 0 or (n_labels and i >= n_labels)})
    if bad:
        raise DataError(
            f"--label-column: DATA {spec!r} has class ids {bad[:5]} outside the model's "
            f"{n_labels} classes (0..{n_labels - 1})"
        )
    return ids, names


def class_label_ids(values, names: list[str], spec: str, model_config) -> tuple[list[int], list[str]]:
    """Class ids of a ClassLabel column in the model's numbering.

    An imagefolder numbers its classes by sorted folder name, which need not be the model's order: when
    the model has class names (not transformers' generic LABEL_<i>) and the data's names are among them,
    each row's id is the model's id of its name. Names partly unknown to the model are refused.
    """
    label2id = {str(k): int(v) for k, v in (getattr(model_config, "label2id", None) or {}).items()}
    generic = all(re.fullmatch(r"LABEL_\d+", name) for name in label2id)
    if generic or not set(names) & set(label2id):
        return [int(v) for v in values], names
    unknown = [name for name in names if name not in label2id]
    if unknown:
        raise DataError(
            f"--label-column: DATA {spec!r} has classes the model does not know: "
            f"{', '.join(map(repr, unknown[:5]))}; the model's classes: {', '.join(label2id)}"
        )
    mapping = [label2id[name] for name in names]
    id2name = {i: name for name, i in label2id.items()}
    return [mapping[int(v)] for v in values], [id2name.get(i, str(i)) for i in range(max(id2name) + 1)]


def resolve_classes(items: list[str], present: set[int], names: list[str] | None, model_config, spec: str) -> list[int]:
    """``--forget-classes`` items (names or ids) as class ids, each present in the data."""
    id2label = {int(k): str(v) for k, v in (getattr(model_config, "id2label", None) or {}).items()}
    by_name = {name: i for i, name in id2label.items()}
    if names:
        by_name.update({name: i for i, name in enumerate(names)})
    known = ", ".join(f"{i} ({names[i]})" if names and i < len(names) else str(i) for i in sorted(present))
    out = []
    for item in items:
        if item in by_name:
            class_id = by_name[item]
        elif item.lstrip("-").isdigit():
            class_id = int(item)
        else:
            raise DataError(f"--forget-classes: no class named {item!r} in DATA {spec!r}; its classes: {known}")
        if class_id not in present:
            raise DataError(f"--forget-classes: DATA {spec!r} has no example of class {item!r}; its classes: {known}")
        out.append(class_id)
    return out
