"""Image DATA to batches of an image classifier: load, pick classes, split by image, preprocess, batch.

An image DATA spec is a directory written by ``datasets``' ``save_to_disk``, an
``imagefolder`` directory (one sub-folder per class), an MLflow artifact URI of
either, or a Hugging Face hub dataset name; ``--image-column`` and
``--label-column`` (defaults ``image`` and ``label``) say where the images and
their class ids are. ``--forget-classes 3,7`` (names or ids) makes the forget
side those classes and the retain side every other class; the same DATA may
then serve both sides.

Each image is keyed by the sha256 of its decoded pixels (mode, size, bytes),
and the keys go through the same split as text documents
(``batching.split_documents``): a *collect* part for statistics and an *eval*
part for metrics that never share an image. Preprocessing is the model's own
image processor. Batches are exactly ``{"pixel_values", "labels"}``. The
data digest (``batching.documents_digest`` over "pixel-sha256 label" lines)
covers pixels, labels and the part each image is in.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch

from ..config import DataOptions, SourceOptions
from .batching import documents_digest, split_documents, split_select
from .labels import label_ids, resolve_classes
from .sources import DataError, _download_mlflow_artifacts, _load_hub, _pick_split
from .specs import BUILTIN_PREFIX, _MLFLOW_URI, looks_like_path

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_COLUMN = "image"
DEFAULT_LABEL_COLUMN = "label"
IMAGE_EXTENSIONS = frozenset(".png .jpg .jpeg .bmp .gif .tif .tiff .webp".split())
_SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")


@dataclass
class PreparedImages:
    """Image batches of one DATA spec (one side), split by image into collect and eval parts.

    Shaped like ``batching.PreparedData`` for the engine: ``collect_tokens`` and
    ``eval_tokens`` hold image counts, ``skip_token_ids`` is empty, and
    ``n_documents`` counts images.
    """

    spec: str
    digest: str
    collect_batches: list[dict]
    eval_batches: list[dict]
    collect_tokens: int
    eval_tokens: int
    n_documents: int
    classes: list[int]
    skip_token_ids: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    documents: datasets.Dataset | None = None  # one row per image used: its pixel digest, label and part
    select_batches: list[dict] | None = None  # budget runs: what the budget reads to stop (None: two parts only)
    select_tokens: int = 0

    @property
    def collect_images(self) -> int:
        return self.collect_tokens

    @property
    def eval_images(self) -> int:
        return self.eval_tokens


# --------------------------------------------------------------------------- loading


def looks_like_image_data(spec: str) -> bool:
    """True for a local directory of image files, or a saved dataset with an image column (cheap checks only)."""
    if not isinstance(spec, str) or spec.startswith(BUILTIN_PREFIX) or _MLFLOW_URI.match(spec):
        return False
    path = Path(spec).expanduser()
    if not path.is_dir():
        return False
    if any((path / m).exists() for m in _SAVED_DATASET_MARKERS):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception:  # noqa: BLE001 - an unreadable saved dataset is the loader's error to report
            return False
        parts = loaded.values() if isinstance(loaded, datasets.DatasetDict) else [loaded]
        return any(isinstance(f, datasets.Image) for part in parts for f in part.features.values())
    for n, file in enumerate(path.rglob("*")):
        if n > 10_000:
            break
        if file.is_file() and file.suffix.lower() in IMAGE_EXTENSIONS:
            return True
    return False


def load_image_dataset(
    spec: str, source: SourceOptions, flag: str, trust_remote_code: bool = False
) -> datasets.Dataset:
    """The raw dataset behind an image DATA spec (all columns)."""
    if spec.startswith(BUILTIN_PREFIX):
        raise DataError(
            f"{flag}: {spec} is text, but the model is an image classifier; give image DATA "
            "(a save_to_disk or imagefolder directory, or a hub dataset)"
        )
    if _MLFLOW_URI.match(spec):
        return load_image_dataset(_download_mlflow_artifacts(spec), source, flag, trust_remote_code)
    path = Path(spec).expanduser()
    if path.is_dir():
        if any((path / m).exists() for m in _SAVED_DATASET_MARKERS):
            try:
                loaded = datasets.load_from_disk(str(path))
            except Exception as exc:
                raise DataError(f"{flag}: could not load the saved dataset in {spec!r}: {exc}") from exc
            return _pick_split(loaded, source.split, spec) if isinstance(loaded, datasets.DatasetDict) else loaded
        if not looks_like_image_data(str(path)):
            raise DataError(
                f"{flag}: directory {spec!r} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}),"
                " but the model is an image classifier; give image DATA (one sub-folder per class, "
                "or a save_to_disk directory)"
            )
        try:
            return datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
        except Exception as exc:
            raise DataError(
                f"{flag}: could not read {spec!r} as an imagefolder directory: {str(exc).splitlines()[0]}"
            ) from exc
    if path.is_file():
        raise DataError(
            f"{flag}: {spec!r} is a file, but the model is an image classifier; give image DATA "
            "(a save_to_disk or imagefolder directory, or a hub dataset)"
        )
    if looks_like_path(spec):
        raise DataError(f"{flag}: no such file or directory: {spec!r}")
    try:
        return _load_hub(
            spec,
            config=source.data_config,
            split=source.split,
            revision=source.revision,
            trust_remote_code=trust_remote_code,
        )
    except DataError as exc:
        raise DataError(f"{flag}: {exc}") from None


def _columns(dataset: datasets.Dataset, spec: str, source: SourceOptions, flag: str) -> tuple[str, str]:
    """(image column, label column), checked: one clear line naming the flag when either is missing."""
    image_column = source.image_column or DEFAULT_IMAGE_COLUMN
    label_column = source.label_column or DEFAULT_LABEL_COLUMN
    columns = list(dataset.column_names)
    available = f"its columns: {', '.join(columns) or '(none)'}"
    if image_column not in columns:
        if source.image_column is None and any(c in columns for c in ("text", "content", "code")):
            raise DataError(
                f"{flag}: DATA {spec!r} holds text, but the model is an image classifier; give image "
                f"DATA, or name the image column with --image-column ({available})"
            )
        raise DataError(
            f"{flag}: DATA {spec!r} has no image column {image_column!r} ({available}); choose it with --image-column"
        )
    if not isinstance(dataset.features[image_column], datasets.Image):
        raise DataError(
            f"{flag}: column {image_column!r} of DATA {spec!r} holds {dataset.features[image_column]}, "
            "not images; choose the image column with --image-column"
        )
    if label_column not in columns:
        raise DataError(
            f"--label-column: DATA {spec!r} ({flag}) has no label column {label_column!r} ({available}); "
            "choose it with --label-column (an imagefolder directory needs one sub-folder per class)"
        )
    return image_column, label_column


# --------------------------------------------------------------------------- preparation


def pixel_key(image) -> bytes:
    """sha256 of an image's decoded pixels (mode, size, raw bytes): the same picture, the same key."""
    digest = hashlib.sha256()
    digest.update(f"{image.mode}|{image.size[0]}x{image.size[1]}|".encode("ascii"))
    digest.update(image.tobytes())
    return digest.digest()


def _convert(image, channels: int):
    return image.convert("L" if channels == 1 else "RGB")


def _batches(
    dataset, rows: list[int], image_column: str, labels: list[int], processor, channels: int, batch_size: int
) -> list[dict]:
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        images = [_convert(img, channels) for img in dataset.select(chunk)[image_column]]
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        if pixel_values.dim() == 3:  # a one-channel processor may drop the channel axis
            pixel_values = pixel_values.unsqueeze(1)
        batches.append(
            {"pixel_values": pixel_values.float(), "labels": torch.tensor([labels[i] for i in chunk], dtype=torch.long)}
        )
    return batches


def prepare_image_side(
    dataset: datasets.Dataset,
    spec: str,
    *,
    image_column: str,
    labels: list[int],
    keep: set[int] | None,
    processor,
    model_config,
    options: DataOptions,
    flag: str,
    select_part: bool = False,
) -> PreparedImages:
    """Batches of the rows whose label is in ``keep`` (None: all), split by pixel hash (``select_part``: the
    eval images alternate with a select part, as text documents do)."""
    rows = [i for i, label in enumerate(labels) if keep is None or label in keep]
    if not rows:
        raise DataError(f"{flag}: DATA {spec!r} has no image of the classes asked for")
    channels = int(getattr(model_config, "num_channels", 3) or 3)
    keys = [pixel_key(_convert(image, channels)) for image in dataset.select(rows)[image_column]]
    collect_order, eval_order = split_documents(keys, options.eval_fraction, f"{flag} {spec}")
    select_order, eval_order = split_select(keys, eval_order, f"{flag} {spec}") if select_part else ([], eval_order)
    collect_rows = [rows[i] for i in collect_order[: options.collect_images]]
    eval_rows = [rows[i] for i in eval_order[: options.eval_images]]
    select_rows = [rows[i] for i in select_order[: options.eval_images]]
    parts = {"collect": collect_rows, "eval": eval_rows, "select": select_rows}
    warnings = _short_parts(parts, options, spec, flag)
    key_of = {rows[i]: keys[i] for i in range(len(rows))}
    lines = {part: [f"{key_of[r].hex()} {labels[r]}" for r in part_rows] for part, part_rows in parts.items()}
    used = collect_rows + eval_rows + select_rows
    classes = sorted({labels[r] for r in used})

    def batches(part_rows):
        return _batches(dataset, part_rows, image_column, labels, processor, channels, options.batch_size)

    prepared = PreparedImages(
        spec=spec,
        digest=documents_digest(lines["collect"], lines["eval"], lines["select"]),
        collect_batches=batches(collect_rows),
        eval_batches=batches(eval_rows),
        collect_tokens=len(collect_rows),
        eval_tokens=len(eval_rows),
        n_documents=len(used),
        classes=classes,
        warnings=warnings,
        documents=datasets.Dataset.from_dict(
            {
                "image_sha256": [key_of[r].hex() for r in used],
                "label": [labels[r] for r in used],
                "part": [part for part, part_rows in parts.items() for _ in part_rows],
            }
        ),
        select_batches=batches(select_rows) if select_part else None,
        select_tokens=len(select_rows),
    )
    logger.debug(
        "DATA %r (%s): %d collect and %d eval images of classes %s, digest %s",
        spec,
        flag,
        len(collect_rows),
        len(eval_rows),
        classes,
        prepared.digest[:12],
    )
    return prepared


def _short_parts(parts: dict, options: DataOptions, spec: str, flag: str) -> list[str]:
    """A warning for a collect or eval part with fewer images than one batch (or than asked for)."""
    warnings = []
    for part, wanted in (("collect", options.collect_images), ("eval", options.eval_images)):
        if len(parts[part]) < min(wanted, options.batch_size):
            message = f"DATA {spec!r} ({flag}): the {part} part has only {len(parts[part])} images"
            logger.warning(message)
            warnings.append(message)
    return warnings


def prepare_image_data(
    forget: str,
    retain: str | None,
    processor,
    model_config,
    options: DataOptions | None = None,
    *,
    trust_remote_code: bool = False,
    select_part: bool = False,
) -> tuple[PreparedImages, PreparedImages]:
    """(forget, retain) image data for an image classifier.

    With ``options.forget_classes``, the forget side keeps only those classes
    and the retain side only the others; ``retain`` may then be None (or the
    same spec as ``forget``): both sides come from the forget DATA.
    """
    options = (options or DataOptions()).validate()
    items = options.forget_class_list()
    if retain is None:
        if items is None:
            raise DataError("--retain is required unless --forget-classes splits one dataset by class")
        retain = forget
    loaded: dict[tuple[str, str], tuple] = {}
    sides = {}
    for side, spec in (("forget", forget), ("retain", retain)):
        source = options.source_for(side)
        flag = f"--{side}"
        cache_key = (os.fspath(spec), repr(source))
        if cache_key not in loaded:
            dataset = load_image_dataset(spec, source, flag, trust_remote_code)
            image_column, label_column = _columns(dataset, spec, source, flag)
            labels, names = label_ids(dataset, spec, label_column, model_config)
            loaded[cache_key] = (dataset, image_column, labels, names)
        sides[side] = (spec, flag, *loaded[cache_key])
    keep: dict[str, set[int] | None] = {"forget": None, "retain": None}
    if items is not None:
        spec, flag, dataset, image_column, labels, names = sides["forget"]
        forget_ids = set(resolve_classes(items, set(labels), names, model_config, spec))
        retain_labels = sides["retain"][4]
        left = set(retain_labels) - forget_ids
        if not left:
            raise DataError(
                f"--forget-classes {options.forget_classes} covers every class of the retain DATA "
                f"{sides['retain'][0]!r}: nothing would be retained; forget fewer classes"
            )
        keep = {"forget": forget_ids, "retain": left}
    prepared = []
    for side in ("forget", "retain"):
        spec, flag, dataset, image_column, labels, names = sides[side]
        if items is not None:  # the lineage and the run's inputs say which classes each side holds
            spec = f"{spec} [{'classes' if side == 'forget' else 'without classes'} {options.forget_classes}]"
        prepared.append(
            prepare_image_side(
                dataset,
                spec,
                image_column=image_column,
                labels=labels,
                keep=keep[side],
                processor=processor,
                model_config=model_config,
                options=options,
                flag=flag,
                select_part=select_part,
            )
        )
    return prepared[0], prepared[1]
