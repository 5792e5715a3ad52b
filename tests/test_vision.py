"""Image classifiers (ViT, DeiT): neurons, statistics over CLS + patch tokens, image data, metrics,
the MLflow round trip, bad input through the real CLI, serving, and the vision demo.

Nothing is mocked: models are real transformers models built from configs, images are real PNGs.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import transformers as T
from PIL import Image

from mlflow_selprune.config import DataOptions
from mlflow_selprune.data.images import pixel_key, prepare_image_data
from mlflow_selprune.data.sources import DataError
from mlflow_selprune.engine.architecture import find_architecture
from mlflow_selprune.engine.statistics import collect_statistics

N_CLASSES = 4
NAMES = ["zero", "one", "two", "three"]


def vit_config(**overrides):
    kwargs = dict(
        image_size=8,
        patch_size=2,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=N_CLASSES,
        id2label=dict(enumerate(NAMES)),
        label2id={n: i for i, n in enumerate(NAMES)},
    )
    kwargs.update(overrides)
    return kwargs


FAMILIES = {
    "vit": lambda: T.ViTForImageClassification(T.ViTConfig(**vit_config())),
    "vit-wide": lambda: T.ViTForImageClassification(
        T.ViTConfig(**vit_config(hidden_size=48, intermediate_size=96, num_attention_heads=6))
    ),
    "deit": lambda: T.DeiTForImageClassification(T.DeiTConfig(**vit_config())),
    "deit-teacher": lambda: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**vit_config())),
}


def processor():
    return T.ViTImageProcessorPil(size={"height": 8, "width": 8}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def make_images(n_per_class: int = 12, seed: int = 0) -> tuple[list[Image.Image], list[int]]:
    """Distinct 8x8 grayscale images: class c is a bright band at row 2c plus seeded noise."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(N_CLASSES):
        for _ in range(n_per_class):
            pixels = rng.integers(0, 60, size=(8, 8))
            pixels[2 * c : 2 * c + 2] += 180
            images.append(Image.fromarray(pixels.astype(np.uint8), mode="L"))
            labels.append(c)
    return images, labels


def write_saved(directory: Path, **kwargs) -> Path:
    images, labels = make_images(**kwargs)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(directory))
    return directory


def write_imagefolder(directory: Path, **kwargs) -> Path:
    images, labels = make_images(**kwargs)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = directory / NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:03d}.png")
    return directory


SMALL = DataOptions(batch_size=8, eval_fraction=0.3)


# ----------------------------------------------------------------------------- neurons and statistics


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_architecture_finds_mlp_and_attention_output_projections(family):
    torch.manual_seed(0)
    model = FAMILIES[family]()
    arch = find_architecture(model)
    config = model.config
    assert arch.n_layers == config.num_hidden_layers
    assert arch.d_mlp == config.intermediate_size and arch.d_attn == config.hidden_size
    assert arch.ff[0].name.endswith("mlp.fc2") and arch.attn[0].name.endswith("attention.o_proj")
    assert arch.n_heads == config.num_attention_heads


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_statistics_cover_cls_and_patch_tokens(family):
    """Per-neuron sums equal a direct computation over every token (CLS, patches; DeiT: + distillation)."""
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    arch = find_architecture(model)
    pixel_values = torch.randn(5, 3, 8, 8)
    batches = [
        {"pixel_values": pixel_values[:3], "labels": torch.tensor([0, 1, 2])},
        {"pixel_values": pixel_values[3:], "labels": torch.tensor([3, 0])},
    ]
    seen = {kind: [] for kind in ("ff", "attn")}
    handles = [
        p.module.register_forward_pre_hook(lambda m, a, kind=kind: seen[kind].append(a[0].detach().clone()))
        for kind in ("ff", "attn")
        for p in arch.projections(kind)
    ]
    with torch.no_grad():
        model(pixel_values=pixel_values)
    for h in handles:
        h.remove()
    n_special = 2 if family.startswith("deit") else 1
    n_tokens = 5 * (16 + n_special)
    stats = collect_statistics(model, batches, sums="all", progress=False)
    for kind in ("ff", "attn"):
        acts = torch.stack([a.reshape(-1, a.shape[-1]).double() for a in seen[kind]])  # [layers, tokens, n]
        assert acts.shape[1] == n_tokens
        s = stats[kind]
        assert s.n_tokens == n_tokens
        torch.testing.assert_close(s.sums["sum_abs"], acts.abs().sum(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.sums["sum"], acts.sum(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.sums["count_pos"], (acts > 0).double().sum(1))


# ----------------------------------------------------------------------------- metrics


def test_image_metric_module_matches_a_direct_computation():
    from mlflow_selprune.evaluation.image_classes import evaluate_image_model, image_classes_metric

    torch.manual_seed(0)
    model = FAMILIES["vit"]().eval()
    pixel_values, labels = torch.randn(11, 3, 8, 8), torch.tensor([0, 1, 2, 3, 3, 2, 1, 0, 3, 3, 1])
    batches = [
        {"pixel_values": pixel_values[:6], "labels": labels[:6]},
        {"pixel_values": pixel_values[6:], "labels": labels[6:]},
    ]
    got = evaluate_image_model(model, batches, prefix="forget_", progress=False)
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits.double()
    predicted = logits.argmax(-1)
    top4 = logits.topk(min(5, N_CLASSES), dim=-1).indices
    expected_loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert got["forget_top1"] == pytest.approx((predicted == labels).double().mean().item(), abs=1e-12)
    assert got["forget_top5"] == pytest.approx((top4 == labels[:, None]).any(-1).double().mean().item(), abs=1e-12)
    assert got["forget_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert got["forget_n_images"] == 11
    for c in range(N_CLASSES):
        chosen = labels == c
        assert got[f"forget_class_{c}_top1"] == pytest.approx((predicted[chosen] == c).double().mean().item())
    # the module alone: ranks count strictly greater logits; a class with no image is NaN
    out = image_classes_metric().compute(
        target_rank=[0, 6, 1], target_logprob=[-0.5, -3.0, -1.0], label=[1, 1, 2], classes=[1, 9]
    )
    assert out["top1"] == pytest.approx(1 / 3) and out["top5"] == pytest.approx(2 / 3)
    assert out["loss"] == pytest.approx(1.5) and out["class_1_top1"] == 0.5 and np.isnan(out["class_9_top1"])


def test_drops_and_selectivity_use_the_image_metrics():
    from mlflow_selprune.evaluation.drops import summary_metrics

    base = {
        "forget_top1": 0.9,
        "forget_top5": 1.0,
        "forget_loss": 0.2,
        "retain_top1": 0.8,
        "retain_top5": 1.0,
        "retain_loss": 0.3,
    }
    new = {
        "forget_top1": 0.45,
        "forget_top5": 0.9,
        "forget_loss": 1.2,
        "retain_top1": 0.78,
        "retain_top5": 1.0,
        "retain_loss": 0.31,
    }
    out = summary_metrics(base, new)
    assert out["forget_top1_drop"] == pytest.approx(0.5) and out["retain_top1_drop"] == pytest.approx(0.025)
    assert out["selectivity"] == pytest.approx(20) and "forget_top10_drop" not in out
    assert "top5_selectivity" in out


# ----------------------------------------------------------------------------- data


@pytest.mark.parametrize("layout", ["saved", "imagefolder"])
def test_image_data_from_saved_and_imagefolder_dirs_split_by_class(tmp_path, layout):
    spec = str((write_saved if layout == "saved" else write_imagefolder)(tmp_path / layout))
    model = FAMILIES["vit"]()
    options = DataOptions(batch_size=8, eval_fraction=0.3, forget_classes="two")
    forget, retain = prepare_image_data(spec, None, processor(), model.config, options)
    assert forget.classes == [2] and retain.classes == [0, 1, 3]
    assert forget.n_documents == 12 and retain.n_documents == 36
    for prepared in (forget, retain):
        assert prepared.skip_token_ids == [] and prepared.digest
        for batch in prepared.collect_batches + prepared.eval_batches:
            assert set(batch) == {"pixel_values", "labels"}
            assert batch["pixel_values"].shape[1:] == (3, 8, 8) and batch["labels"].dtype == torch.long
        # the collect and eval parts never share an image
        rows = prepared.documents.to_dict()
        collect = {h for h, part in zip(rows["image_sha256"], rows["part"]) if part == "collect"}
        evals = {h for h, part in zip(rows["image_sha256"], rows["part"]) if part == "eval"}
        assert collect and evals and not collect & evals
        assert prepared.collect_images + prepared.eval_images == prepared.n_documents
    # by id gives the same data as by name; the digest covers pixels and labels
    by_id = prepare_image_data(
        spec, spec, processor(), model.config, DataOptions(batch_size=8, eval_fraction=0.3, forget_classes="2")
    )
    assert (by_id[0].digest, by_id[1].digest) == (forget.digest, retain.digest)
    other = prepare_image_data(
        spec, None, processor(), model.config, DataOptions(batch_size=8, eval_fraction=0.3, forget_classes="1")
    )
    assert other[0].digest != forget.digest and other[1].digest != retain.digest


def test_saved_and_imagefolder_layouts_hold_the_same_pixels(tmp_path):
    saved = write_saved(tmp_path / "saved")
    folder = write_imagefolder(tmp_path / "folder")
    model = FAMILIES["vit"]()
    a = prepare_image_data(str(saved), None, processor(), model.config, DataOptions(forget_classes="3"))
    b = prepare_image_data(str(folder), None, processor(), model.config, DataOptions(forget_classes="3"))
    assert sorted(a[0].documents["image_sha256"]) == sorted(b[0].documents["image_sha256"])
    assert a[0].digest == b[0].digest  # same pixels, labels and parts: the same digest, whatever the layout


def test_pixel_key_depends_on_pixels_only(tmp_path):
    image = make_images(1)[0][0]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=0)
    assert pixel_key(Image.open(io.BytesIO(buffer.getvalue())).convert("L")) == pixel_key(image)
    changed = image.copy()
    changed.putpixel((0, 0), (image.getpixel((0, 0)) + 1) % 256)
    assert pixel_key(changed) != pixel_key(image)


@pytest.mark.parametrize(
    "classes, message",
    [
        ("seven", "--forget-classes: no class named 'seven'"),
        ("9", "--forget-classes: DATA"),
        ("0,1,2,3", "covers every class"),
    ],
)
def test_bad_forget_classes_are_refused(tmp_path, classes, message):
    spec = str(write_saved(tmp_path / "d"))
    with pytest.raises(DataError, match=message):
        prepare_image_data(spec, None, processor(), FAMILIES["vit"]().config, DataOptions(forget_classes=classes))


# ----------------------------------------------------------------------------- MLflow: CLI, round trip, serving


@pytest.fixture(scope="module")
def vision_store(tmp_path_factory):
    """A sqlite store with a registered tiny ViT (tiny-vit@base, trained a few steps) and image DATA."""
    import mlflow

    from mlflow_selprune.registry.flavor import components, default_pip_requirements, model_card
    from mlflow_selprune.training import train_image_classifier

    root = tmp_path_factory.mktemp("vision")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    saved = write_saved(root / "saved")
    folder = write_imagefolder(root / "folder", seed=1)
    torch.manual_seed(0)
    model = FAMILIES["vit"]()
    proc = processor()
    images, labels = make_images()
    pixel_values = proc(images=[i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]
    train_image_classifier(model, pixel_values, torch.tensor(labels), steps=40, batch_size=16, progress=False)
    with mlflow.start_run(run_name="register-tiny-vit"):
        info = mlflow.transformers.log_model(
            components(model, proc),
            name="model",
            task="image-classification",
            pip_requirements=default_pip_requirements(),
            model_card=model_card(model),
        )
    mv = mlflow.register_model(info.model_uri, "tiny-vit")
    mlflow.MlflowClient().set_registered_model_alias("tiny-vit", "base", mv.version)
    text = root / "text.txt"
    text.write_text("Some prose.\n\nMore prose here.\n\nAnd a third paragraph.\n")
    # an unsupported vision architecture: a MobileNetV2 image classifier (neither transformer blocks nor a
    # convolutional family known to engine/convolutional.py)
    mobilenet = T.MobileNetV2ForImageClassification(
        T.MobileNetV2Config(image_size=8, depth_multiplier=0.25, num_labels=N_CLASSES)
    )
    mobilenet_dir = root / "mobilenet"
    mobilenet.save_pretrained(mobilenet_dir)
    proc.save_pretrained(mobilenet_dir)
    yield {
        "root": root,
        "uri": uri,
        "saved": str(saved),
        "folder": str(folder),
        "text": str(text),
        "mobilenet": str(mobilenet_dir),
        "env": {"MLFLOW_TRACKING_URI": uri},
    }
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


def _registry_state():
    import mlflow

    client = mlflow.MlflowClient()
    versions = sorted((v.name, v.version) for v in client.search_model_versions())
    runs = sorted(r.info.run_id for e in client.search_experiments() for r in client.search_runs([e.experiment_id]))
    return versions, runs


def _cli(store, *args, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, **store["env"], HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "mlflow_selprune", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=store["root"],
        timeout=timeout,
    )


# One case goes through a fresh `mlflow-selprune` process (python -m, the console script's code); the
# others through the same CLI in this process (click's runner): the code path without ~15 s of start-up.
SUBPROCESS_CASES = {"text-data-for-vit"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        "text-data-for-vit",
        "images-for-lm",
        "no-label-column",
        "unknown-class",
        "every-class",
        "unsupported-architecture",
    ],
)
def test_bad_vision_input_exits_2_with_one_line_and_writes_nothing(vision_store, case, tmp_path):
    s = vision_store
    vit = "models:/tiny-vit@base"
    lm_dir = tmp_path / "lm"
    if case == "images-for-lm":
        from mlflow_selprune.training import train_bpe_tokenizer

        tok = train_bpe_tokenizer(["hello world, some text"] * 20, vocab_size=300)
        T.GPT2LMHeadModel(T.GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2)).save_pretrained(lm_dir)
        tok.save_pretrained(lm_dir)
    no_label = tmp_path / "nolabel"
    if case == "no-label-column":
        images, _ = make_images(4)
        datasets.Dataset.from_dict(
            {"image": images}, features=datasets.Features({"image": datasets.Image()})
        ).save_to_disk(str(no_label))
    args = {
        "text-data-for-vit": (vit, ["--forget", s["text"], "--retain", s["saved"]], "--forget"),
        "images-for-lm": (
            str(lm_dir),
            ["--forget", s["folder"], "--retain", s["text"], "--register-as", "x"],
            "--forget",
        ),
        "no-label-column": (vit, ["--forget", str(no_label), "--retain", s["saved"]], "--label-column"),
        "unknown-class": (vit, ["--forget", s["saved"], "--forget-classes", "seven"], "--forget-classes"),
        "every-class": (vit, ["--forget", s["saved"], "--forget-classes", "0,1,two,3"], "--forget-classes"),
        "unsupported-architecture": (
            s["mobilenet"],
            ["--forget", s["saved"], "--forget-classes", "1", "--register-as", "x"],
            "MobileNetV2ForImageClassification",
        ),
    }[case]
    before = _registry_state()
    argv = ("prune", "--model-uri", args[0], *args[1], "--no-progress")
    if case in SUBPROCESS_CASES:
        out = _cli(s, *argv)
        code, stderr = out.returncode, out.stderr
    else:
        from mlflow_helpers import invoke

        out = invoke(*argv)
        code, stderr = out.exit_code, out.stderr
    assert code == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and args[2] in errors[0], stderr
    assert stderr.strip().splitlines()[-1] == errors[0]  # the last word; before it only the store and load bars
    assert _registry_state() == before


@pytest.fixture(scope="module")
def pruned_vit(vision_store):
    """tiny-vit@base pruned through the CLI in this process (click's runner), from the store's root as `_cli` runs
    it: the tests that use the version are about what it holds, not about a process's start-up."""
    from mlflow_helpers import invoke

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(vision_store["root"])
        out = invoke(
            "prune",
            "--model-uri",
            "models:/tiny-vit@base",
            "--forget",
            vision_store["saved"],
            "--forget-classes",
            "two",
            "--ff-frac",
            "0.1",
            "--attn-frac",
            "0.05",
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--eval-fraction",
            "0.3",
            "--no-progress",
        )
    assert out.exit_code == 0, out.stderr
    return {"uri": out.stdout.strip().splitlines()[-1].split()[1], "stdout": out.stdout}


@pytest.mark.slow
def test_prune_register_load_round_trip_is_exact(vision_store, pruned_vit):
    import mlflow

    from mlflow_selprune.registry import lineage
    from mlflow_selprune.registry.flavor import load_model
    from mlflow_selprune.registry.loading import download, load_components
    from mlflow_selprune.registry.resolve import resolve

    uri = pruned_vit["uri"]
    assert uri.startswith("models:/tiny-vit/")
    tags = resolve(uri).tags
    assert tags[lineage.FORGET_DATA].endswith("[classes two]")
    assert tags[lineage.RETAIN_DATA].endswith("[without classes two]")
    for key in ("forget_top1", "retain_top1", "forget_top1_drop", "control_forget_top1_drop"):
        assert lineage.METRIC_PREFIX + key in tags, key
    model, image_processor = load_components(resolve(uri))
    assert type(model).__name__ == "ViTForImageClassification"
    assert type(image_processor).__name__.startswith("ViTImageProcessor")
    assert lineage.weights_sha256(model) == tags[lineage.WEIGHTS_SHA]
    # the pruned columns are zero in the saved weights, and from_pretrained gives them back exactly
    local = download(resolve(uri))
    reloaded = T.ViTForImageClassification.from_pretrained(local / "model")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
    arch = find_architecture(reloaded)
    zeroed = sum(int((p.columns() == 0).all(0).sum()) for p in arch.ff)
    assert zeroed == int(tags[lineage.FF_PRUNED]) > 0
    info = mlflow.models.get_model_info(uri)
    assert info.flavors["transformers"]["task"] == "image-classification"
    assert info.flavors["transformers"]["components"] == ["image_processor"]
    loaded = load_model(uri)
    assert loaded["tokenizer"] is None and loaded["image_processor"] is not None and loaded["record"]
    run = mlflow.get_run(tags[lineage.RUN_ID])
    assert run.data.metrics["forget_n_images"] > 0 and "forget_class_2_top1" in run.data.metrics


@pytest.mark.slow
def test_served_vit_classifies_a_base64_png(vision_store, pruned_vit):
    from mlflow_helpers import post_json, served_model

    image = make_images(1)[0][2]  # a "two"
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    with served_model(pruned_vit["uri"], vision_store) as (url, _):
        answer = post_json(url, {"inputs": [base64.b64encode(buffer.getvalue()).decode()]})
    predictions = answer["predictions"]
    first = predictions[0] if isinstance(predictions, list) else predictions
    labels = (
        {p["label"] for p in (first if isinstance(first, list) else [first])}
        if not isinstance(first, dict) or "label" in first
        else {v["label"] for v in first.values()}
    )
    assert labels and labels <= set(NAMES), answer


@pytest.mark.slow
def test_the_samples_table_shows_each_eval_image_beside_the_three_predictions(vision_store, pruned_vit, tmp_path):
    """The image column: MLflow stores each image beside the table (a PNG the table view shows), the image the
    model saw (enlarged, normalization undone); the report embeds the same pictures inline."""
    import json

    from mlflow.tracking import MlflowClient

    from mlflow_selprune.registry.resolve import resolve

    client = MlflowClient()
    run_id = resolve(pruned_vit["uri"]).run_id
    table = json.loads(Path(client.download_artifacts(run_id, "selprune/samples.json", str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert rows and all(r["image"]["type"] == "image" for r in rows)
    picture = Image.open(client.download_artifacts(run_id, rows[0]["image"]["filepath"], str(tmp_path)))
    assert picture.size == (64, 64)  # the 8x8 eval image, each pixel 8x8
    assert len(set(picture.getdata())) > 1  # a digit, not a blank square
    assert all(r["parent"] in NAMES and r["unlearned"] in NAMES for r in rows)
    report = Path(client.download_artifacts(run_id, "selprune/report.html", str(tmp_path))).read_text()
    assert report.count('<td><img alt="sample" src="data:image/png;base64,') == len(rows)


# ----------------------------------------------------------------------------- the vision demo


@pytest.mark.slow
def test_vision_demo_training_is_deterministic(tmp_path):
    """Same seed, same steps: the same weights digest (at reduced steps), whatever the caller's thread count."""
    from mlflow_selprune.demo_vision import train_demo_model, write_digits
    from mlflow_selprune.registry.lineage import weights_sha256

    data_dir = write_digits(tmp_path / "digits")
    digests = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        model, _, accuracy = train_demo_model(data_dir, seed=0, steps=8, progress=False)
        digests.append(weights_sha256(model))
    torch.set_num_threads(1)
    assert digests[0] == digests[1] and 0 <= accuracy <= 1
    other, _, _ = train_demo_model(data_dir, seed=1, steps=8, progress=False)
    assert weights_sha256(other) != digests[0]


@pytest.mark.slow(seconds=40)
def test_the_readme_vision_demo_command_passes_its_gate(tmp_path):
    """`mlflow-selprune demo --vision` exactly as the README prints it, in an empty directory: trains, registers,
    forgets digit 3, passes its gate (exit 0) and points @unlearned at the result."""
    import shutil

    from mlflow.tracking import MlflowClient

    from mlflow_selprune.demo_vision import MAX_RETAIN_DROP, MIN_FORGET_DROP, MIN_SELECTIVITY

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run(
        [shutil.which("mlflow-selprune"), "demo", "--vision"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    from mlflow_helpers import recorded

    unlearned = recorded(client.get_model_version_by_alias("selprune-vision-demo", "unlearned"), client.tracking_uri)
    # the gate's own thresholds (set from the recipe's worst case over seeds x thread counts), nothing stricter:
    # a machine that rounds differently trains a different model, and the demo promises only its gate
    assert float(unlearned.tags["selprune.metric.forget_top1_drop"]) >= MIN_FORGET_DROP
    assert float(unlearned.tags["selprune.metric.retain_top1_drop"]) <= MAX_RETAIN_DROP
    assert float(unlearned.tags["selprune.metric.selectivity"]) >= MIN_SELECTIVITY
    assert "selprune.metric.control_forget_top1_drop" in unlearned.tags
