"""The offline vision demo: forget one handwritten digit, keep the other nine.

1. Write scikit-learn's handwritten digits (1,797 8x8 images; a test-extra
   dependency) as a ``save_to_disk`` dataset under ``./selprune-vision-data``.
2. Train a small ViT (8x8 images, 4x4 patches: 4 patch tokens + CLS; one layer) for a
   fixed number of seeded steps on the images the pruning will use as its
   *collect* part (the same hash split), so its test accuracy is measured on
   images it never saw; register it as ``selprune-vision-demo@base``.
3. Forget digit ``FORGET_CLASS`` (``--forget-classes``) from the same DATA,
   with the random control beside it; register the result, gate it, and on a
   pass point ``selprune-vision-demo@unlearned`` at it.

Steps, seeds and the torch thread count (``TORCH_THREADS``) decide
everything; the clock never does.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import DataOptions, PruneConfig
from .demo import (
    BASE_ALIAS,
    _existing_base,
    _nothing,
    checked_train_steps,
    say_reused,
    ensure_tracking_uri,
    register_base_model,
    summarize_and_gate,
)

logger = logging.getLogger(__name__)

VISION_DEMO_MODEL = "selprune-vision-demo"
DATA_DIR = "selprune-vision-data"
FORGET_CLASS = "3"
# Fixed, so results never depend on the machine. One thread: a model this small gains nothing from more,
# and two threads on a busy 2-core machine were 20x slower per step (contention), never different.
TORCH_THREADS = 1


@dataclass(frozen=True)
class VisionRecipe:
    """The demo ViT, its training and its pruning, chosen by measurement across seeds and torch thread
    counts (docs/vision-demo-frontier.md; examples/benchmarks/vision_demo_margins.py).

    4x4 patches (4 patch tokens + CLS), one layer with a wide MLP, lr 1e-3: the recipe whose worst case
    over 3 seeds x 3 thread counts still forgets digit 3 and keeps the others. The earlier recipe (2x2
    patches, 4 layers, MLP 512, lr 3e-3; the same pruning) had, over the same 9 runs, a worst forget drop
    of 6.9% and a worst retain drop of 12.0%: which seed and thread count trained it decided the outcome.
    """

    image_size: int = 8
    patch_size: int = 4
    hidden_size: int = 64
    num_layers: int = 1
    num_heads: int = 4
    intermediate_size: int = 2048
    train_steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3  # at 3e-3 some seeds hid digit 3 in shared neurons (forget drop < 40%): see the frontier
    forget_class: str = FORGET_CLASS
    prune: PruneConfig = field(default_factory=lambda: PruneConfig(ff_frac=0.02, attn_frac=0.0, steps=4))
    data: DataOptions = field(
        default_factory=lambda: DataOptions(batch_size=64, eval_fraction=0.3, forget_classes=FORGET_CLASS)
    )


RECIPE = VisionRecipe()

# The gate the demo must pass, set from the recipe's measured worst case, not from a wish. Rule (the margins
# cover a CPU that rounds differently from the ones measured): the minimum forget drop at most 1/2 of the
# worst measured, the maximum retain drop at least 2x the worst measured (a drop under the 1% noise floor,
# drops.RETAIN_DROP_FLOOR, counts as 1%), the minimum selectivity at most 1/2 of the worst measured.
# Measured (examples/benchmarks/vision_demo_margins.py; docs/vision-demo-frontier.md): seeds 0,1,2 x torch
# threads 1,2,4 for training and pruning, 9 runs: worst forget top-1 drop 0.949, worst retain top-1 drop 0.000
# (every run -0.2%..0.0%), worst selectivity 94.9. Seeds 3..9 (1 thread) added: worst forget 0.677 (seed 6),
# worst retain 0.004, worst selectivity 67.7. The gate holds the rule over all 16 runs:
MIN_FORGET_DROP = 0.33  # <= 0.677 / 2 (<= 0.949 / 2 over the 9 runs)
MAX_RETAIN_DROP = 0.02  # >= 2 x max(0.004, RETAIN_DROP_FLOOR 0.01)
MIN_SELECTIVITY = 16.5  # = MIN_FORGET_DROP / MAX_RETAIN_DROP; <= 67.7 / 2


def write_digits(directory: str | Path) -> Path:
    """scikit-learn's digits as a ``save_to_disk`` dataset (``image``: 8x8 grayscale PNG, ``label``: 0-9)."""
    import datasets
    import numpy as np
    from PIL import Image

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        from .errors import BadInputError

        raise BadInputError(
            "the vision demo needs scikit-learn for its digits: pip install scikit-learn "
            "(it comes with the test extra: pip install -e '.[test]')"
        ) from None
    directory = Path(directory)
    if (directory / "dataset_info.json").is_file():
        return directory
    digits = load_digits()
    images = [Image.fromarray(np.clip(img * 16, 0, 255).astype(np.uint8), mode="L") for img in digits.images]
    names = [str(i) for i in range(10)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    dataset = datasets.Dataset.from_dict({"image": images, "label": [int(t) for t in digits.target]}, features=features)
    dataset.save_to_disk(str(directory))
    return directory


def image_processor(recipe: VisionRecipe = RECIPE):
    """The demo model's own preprocessing: scale to [0, 1], normalize to [-1, 1], RGB at 8x8."""
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(
        size={"height": recipe.image_size, "width": recipe.image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


def train_demo_vit(
    data_dir: str | Path,
    recipe: VisionRecipe = RECIPE,
    seed: int = 0,
    steps: int | None = None,
    progress: bool = True,
    threads: int = TORCH_THREADS,
):
    """(model, image processor, test accuracy): a ViT trained on the collect part of the digits only.

    ``threads``: the torch thread count while training (restored after); the demo always uses
    ``TORCH_THREADS``, the margin benchmark varies it (examples/benchmarks/vision_demo_margins.py)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from .data.images import prepare_image_data
    from .training import train_image_classifier

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        processor = image_processor(recipe)
        names = [str(i) for i in range(10)]
        config = ViTConfig(  # type: ignore[call-arg]  # PretrainedConfig takes num_labels, id2label, ...
            image_size=recipe.image_size,
            patch_size=recipe.patch_size,
            num_channels=3,
            hidden_size=recipe.hidden_size,
            num_hidden_layers=recipe.num_layers,
            num_attention_heads=recipe.num_heads,
            intermediate_size=recipe.intermediate_size,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=10,
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
        )
        # all classes, split exactly as the pruning will split them: training never sees an eval image
        split = dataclasses.replace(recipe.data, forget_classes=None, collect_images=10**9, eval_images=10**9)
        both, _ = prepare_image_data(str(data_dir), str(data_dir), processor, config, split)
        train_x = torch.cat([b["pixel_values"] for b in both.collect_batches])
        train_y = torch.cat([b["labels"] for b in both.collect_batches])
        torch.manual_seed(seed)
        model = ViTForImageClassification(config)
        loss = train_image_classifier(
            model,
            train_x,
            train_y,
            steps=recipe.train_steps if steps is None else steps,
            batch_size=recipe.batch_size,
            lr=recipe.lr,
            seed=seed,
            progress=progress,
        )
        with torch.inference_mode():
            correct = sum(
                int((model(pixel_values=b["pixel_values"]).logits.argmax(-1) == b["labels"]).sum())
                for b in both.eval_batches
            )
        accuracy = correct / both.eval_images
    finally:
        torch.set_num_threads(previous_threads)
    logger.info(
        "vision demo model trained: final loss %.3f, test accuracy %.4f on %d images", loss, accuracy, both.eval_images
    )
    return model, processor, accuracy


def run_vision_demo(
    train_steps: int | None = None,
    seed: int = 0,
    retrain: bool = False,
    progress: bool = True,
    recipe: VisionRecipe = RECIPE,
) -> int:
    """Run the vision demo; returns the exit code (0 when the gate passed)."""
    steps = checked_train_steps(train_steps, recipe.train_steps)  # before anything is trained or written
    import torch

    from .registry.tracking import job_run
    from .unlearn import run_prune

    torch.set_num_threads(TORCH_THREADS)
    start = time.monotonic()
    uri = ensure_tracking_uri()
    print(f"tracking and registry: {uri}")
    data_dir = write_digits(Path(DATA_DIR).resolve())
    with job_run("selprune-vision-demo", "demo") if os.environ.get("MLFLOW_RUN_ID") else _nothing():
        base = None if retrain else _existing_base(VISION_DEMO_MODEL)
        if base:
            say_reused(base, VISION_DEMO_MODEL, train_steps)
        else:
            print(f"training the vision demo model ({steps} steps, seed {seed})...")
            trained_at = time.monotonic()
            model, processor, accuracy = train_demo_vit(data_dir, recipe, seed=seed, steps=steps, progress=progress)
            training_seconds = round(time.monotonic() - trained_at, 1)
            print(f"test accuracy (held-out digits): {accuracy:.4f}")
            base = register_base_model(
                model,
                processor,
                seed,
                steps,
                name=VISION_DEMO_MODEL,
                extra_metrics={"demo_test_accuracy": accuracy, "training_seconds": training_seconds},
            )
            print(f"registered {base} as {VISION_DEMO_MODEL}@{BASE_ALIAS}")
        print(f"unlearning digit {recipe.forget_class} of {data_dir} while keeping the other digits...")
        data = dataclasses.replace(recipe.data, forget_classes=recipe.forget_class)
        result = run_prune(
            f"models:/{VISION_DEMO_MODEL}@{BASE_ALIAS}",
            str(data_dir),
            None,
            config=dataclasses.replace(recipe.prune, seed=seed),
            data=data,
            progress=progress,
        )
        return summarize_and_gate(
            result,
            VISION_DEMO_MODEL,
            min_forget_drop=MIN_FORGET_DROP,
            max_retain_drop=MAX_RETAIN_DROP,
            min_selectivity=MIN_SELECTIVITY,
            start=start,
        )
