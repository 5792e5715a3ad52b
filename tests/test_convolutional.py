"""Convolutional image classifiers (ResNet, ConvNeXt v1/v2, RegNet): their neurons, statistics over every
position of a feature map, exact pruning and reload, the random control, refusal of other families, and a
ResNet through the whole registry path (register, prune, lineage --verify, gate) and the CNN demos.

Nothing is mocked: real transformers models built from configs, real images, a real sqlite MLflow store.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
import transformers as T

from mlflow_selprune import PruneConfig, find_architecture, prune
from mlflow_selprune.engine import randomly_pruned
from mlflow_selprune.engine.architecture import UnsupportedArchitectureError
from mlflow_selprune.engine.statistics import collect_statistics
from mlflow_selprune.engine.surgery import pruned_columns
from mlflow_selprune.errors import BadInputError

LABELS = dict(
    num_channels=3, num_labels=4, id2label={i: str(i) for i in range(4)}, label2id={str(i): i for i in range(4)}
)

# family -> (the model, each block's neuron count as its config says)
FAMILIES = {
    "resnet-basic": (
        lambda: T.ResNetForImageClassification(
            T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 1], layer_type="basic", **LABELS)
        ),
        [8, 8, 16],  # a basic block's last conv takes the block's width
    ),
    "resnet-bottleneck": (
        lambda: T.ResNetForImageClassification(
            T.ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 2], layer_type="bottleneck", **LABELS)
        ),
        [4, 8, 8],  # a bottleneck's last conv takes the reduced width (a quarter)
    ),
    "convnext": (
        lambda: T.ConvNextForImageClassification(
            T.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 2], num_stages=2, layer_scale_init_value=1.0, **LABELS)
        ),
        [32, 64, 64],  # the second pointwise Linear takes 4x the stage width
    ),
    "convnextv2": (
        lambda: T.ConvNextV2ForImageClassification(
            T.ConvNextV2Config(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, **LABELS)
        ),
        [32, 64],
    ),
    "regnet": (
        lambda: T.RegNetForImageClassification(
            T.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4, **LABELS)
        ),
        [8, 16],
    ),
}


def images(n: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, 32, 32, generator=generator)
    labels = torch.arange(n) % 4
    return [{"pixel_values": pixels[i : i + 4], "labels": labels[i : i + 4]} for i in range(0, n, 4)]


def built(family: str):
    torch.manual_seed(0)
    return FAMILIES[family][0]().eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_discovery_reports_every_block_with_its_width(family):
    model = built(family)
    arch = find_architecture(model)
    widths = FAMILIES[family][1]
    assert arch.widths("ff") == widths and arch.n_layers == len(widths)
    assert arch.attn == () and arch.shape("attn") == (0, 0)
    assert arch.shape("ff") == (len(widths), max(widths))
    assert arch.valid("ff").sum(1).tolist() == widths
    described = arch.describe()
    assert described["d_mlp"] == widths and described["d_attn"] is None and described["attn_projection"] is None
    assert "*" in described["blocks"] and described["model_class"] == type(model).__name__


@pytest.mark.parametrize("family", ["resnet-bottleneck", "convnext"])
def test_statistics_are_means_over_every_position_and_image(family):
    """A feature map counts per image: the sums equal a direct computation over batch x height x width,
    divided by height x width, and the count is the number of images."""
    model = built(family)
    arch = find_architecture(model)
    batches = images(12, seed=1)
    seen = []
    handles = [
        p.module.register_forward_pre_hook(lambda m, a: seen.append((m, a[0].detach().clone()))) for p in arch.ff
    ]
    with torch.no_grad():
        for batch in batches:
            model(pixel_values=batch["pixel_values"])
    for handle in handles:
        handle.remove()
    stats = collect_statistics(model, batches, sums="all", kinds=("ff",), progress=False)
    assert stats.ff.n_tokens == 12
    for layer, projection in enumerate(arch.ff):
        maps = [x for m, x in seen if m is projection.module]
        if isinstance(projection.module, torch.nn.Conv2d):
            maps = [x.movedim(1, -1) for x in maps]
        rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in maps]).double()
        positions = maps[0].shape[1] * maps[0].shape[2]
        width = projection.n_neurons
        for name, values in (("sum_abs", rows.abs()), ("sum_sq", rows * rows), ("count_pos", (rows > 0).double())):
            expected = values.sum(0) / positions
            torch.testing.assert_close(stats.ff.sums[name][layer, :width], expected, rtol=1e-5, atol=1e-6)
            assert not stats.ff.sums[name][layer, width:].any()  # past the layer's width: no neurons


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("selection", ["global", "per-layer"])
def test_pruning_zeroes_exactly_the_chosen_input_channels_and_reloads_exactly(family, selection, tmp_path):
    model = built(family)
    arch = find_architecture(model)
    widths = FAMILIES[family][1]
    forget, retain = images(8, seed=2), images(8, seed=3)
    result = prune(model, forget, retain, PruneConfig(ff_frac=0.1, steps=2, selection=selection), progress=False)
    mask = result.ff_mask
    if selection == "global":
        assert int(mask.sum()) == 2 * round(0.1 * sum(widths))
    else:
        assert mask.sum(1).tolist() == [2 * round(0.1 * w) for w in widths]
    assert not (mask & ~arch.valid("ff")).any()  # never a position past a layer's width
    assert torch.equal(pruned_columns(arch, "ff"), mask)  # zeroed in the weights: those channels, no others
    for projection, row in zip(arch.ff, mask):
        index = row[: projection.n_neurons].nonzero().squeeze(1)
        assert not projection.columns()[:, index].any()
        assert not projection.module._forward_pre_hooks and not projection.module._forward_hooks
    pixels = images(4, seed=4)[0]["pixel_values"]
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).logits, logits)
    assert torch.equal(pruned_columns(find_architecture(reloaded), "ff"), mask)


@pytest.mark.parametrize("family", ["resnet-basic", "convnext"])
def test_the_random_control_prunes_as_many_per_layer_within_each_width_and_restores(family, tmp_path):
    model = built(family)
    arch = find_architecture(model)
    result = prune(model, images(8, seed=2), images(8, seed=3), PruneConfig(ff_frac=0.2, steps=1), progress=False)
    pruned = {k: v.clone() for k, v in model.state_dict().items()}
    pixels = images(4, seed=4)[0]["pixel_values"]
    with randomly_pruned(model, result, seed=0) as masks:
        control = masks["ff"]
        assert control.sum(1).tolist() == result.ff_mask.sum(1).tolist()
        assert not (control & ~arch.valid("ff")).any()
        assert torch.equal(pruned_columns(arch, "ff"), control)
        assert not torch.equal(control, result.ff_mask)
        with torch.no_grad():
            logits = model(pixel_values=pixels).logits
        model.save_pretrained(tmp_path)  # the control is a plain model too: saved and reloaded exactly
        reloaded = type(model).from_pretrained(tmp_path).eval()
        with torch.no_grad():
            assert torch.equal(reloaded(pixel_values=pixels).logits, logits)
    assert all(torch.equal(v, pruned[k]) for k, v in model.state_dict().items())


def test_relearning_fine_tunes_a_copy_of_a_cnn_with_its_classification_loss():
    """The relearning check's fine-tuning (engine.relearn) on a ResNet: batch norm in train mode, the labels'
    cross-entropy; the model it was given is untouched."""
    from mlflow_selprune.engine.control import relearn

    model = built("resnet-basic")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = images(8, seed=5)
    losses = []

    def measure(step, tuned):
        with torch.no_grad():
            losses.append(float(tuned(pixel_values=batches[0]["pixel_values"], labels=batches[0]["labels"]).loss))

    tuned = relearn(model, batches, steps=6, lr=1e-2, seed=0, measure_at=(0, 6), measure=measure)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not tuned.training and len(losses) == 2 and losses[1] < losses[0]


def test_another_cnn_family_is_refused_in_one_line_naming_the_supported_ones():
    model = T.MobileNetV2ForImageClassification(T.MobileNetV2Config(image_size=32, depth_multiplier=0.25, **LABELS))
    with pytest.raises(UnsupportedArchitectureError) as refused:
        find_architecture(model)
    line = str(refused.value)
    assert "\n" not in line and "MobileNetV2ForImageClassification" in line
    assert all(family in line for family in ("convnext", "convnextv2", "regnet", "resnet"))


def test_a_windowed_feature_map_counts_per_image():
    """A transformer whose attention projection takes windows ([B x windows, h, w, C], ViTDet) counts each image
    once, as a CNN's feature map does: the sums are per-image means over every position of every window."""
    torch.manual_seed(0)
    config = T.VitDetConfig(
        image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
        window_size=2, window_block_indices=[0], pretrain_image_size=16,
    )  # fmt: skip
    model = T.VitDetModel(config).eval()
    arch = find_architecture(model)
    pixels = torch.randn(3, 3, 16, 16)
    seen = []
    handle = arch.attn[0].module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        model(pixel_values=pixels)
    handle.remove()
    assert seen[0].shape[0] > 3  # windows: more maps than images
    rows = seen[0].reshape(-1, seen[0].shape[-1]).double()
    stats = collect_statistics(model, [{"pixel_values": pixels}], sums="sum_abs", progress=False)
    assert stats.attn.n_tokens == stats.ff.n_tokens == 3
    torch.testing.assert_close(stats.attn.sums["sum_abs"][0], rows.abs().sum(0) / (rows.shape[0] // 3))


def test_statistics_of_neurons_a_cnn_lacks_are_refused():
    model = built("resnet-basic")
    with pytest.raises(BadInputError, match="ResNetForImageClassification has no attn neurons"):
        collect_statistics(model, images(4, 0), kinds=("attn",), progress=False)
    assert collect_statistics(model, images(4, 0), progress=False).attn is None  # by default: the kinds it has


@pytest.mark.parametrize("family,refused", [("resnet-basic", True), ("regnet", True), ("convnext", False)])
def test_the_quantization_check_is_refused_where_no_pruned_weight_is_quantized(family, refused):
    """GGUF quantizes Linear weights: a ResNet's pruned convolutions would stay in float and the check would
    measure only its head. ConvNeXt's neurons feed a Linear, which is quantized when its rows are 32-multiples."""
    from mlflow_selprune.config import EvidenceOptions
    from mlflow_selprune.unlearn import check_code_tasks

    model = built(family)
    evidence = EvidenceOptions(quantized_check="int4")
    if refused:
        with pytest.raises(BadInputError, match="--quantized-check: no weight that pruning edits"):
            check_code_tasks(evidence, model)
    else:
        check_code_tasks(evidence, model)


def test_attention_neurons_of_a_cnn_are_refused_naming_the_flag():
    model = built("resnet-basic")
    with pytest.raises(BadInputError, match="--attn-frac 0.1: ResNetForImageClassification has no attention"):
        prune(model, images(4, 0), images(4, 1), PruneConfig(ff_frac=0.1, attn_frac=0.1, steps=1), progress=False)


# ----------------------------------------------------------------------------- the registry path


@pytest.fixture(scope="module")
def resnet_store(tmp_path_factory):
    """A sqlite store and a tiny ResNet trained a few steps on the tests' band images, saved with its image
    processor (registered by the test through the CLI)."""
    import mlflow
    from test_vision import NAMES, make_images, processor, write_saved

    from mlflow_selprune.training import train_image_classifier

    root = tmp_path_factory.mktemp("resnet")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    labels = dict(LABELS, id2label=dict(enumerate(NAMES)), label2id={n: i for i, n in enumerate(NAMES)})
    torch.manual_seed(0)
    model = T.ResNetForImageClassification(
        T.ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", **labels)
    )
    proc = processor()
    pictures, targets = make_images()
    pixel_values = proc(images=[i.convert("RGB") for i in pictures], return_tensors="pt")["pixel_values"]
    train_image_classifier(model, pixel_values, torch.tensor(targets), steps=40, batch_size=16, progress=False)
    model.eval().save_pretrained(root / "resnet")
    proc.save_pretrained(root / "resnet")
    yield {"root": root, "model": str(root / "resnet"), "saved": str(write_saved(root / "saved"))}
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.mark.slow(seconds=20)
def test_a_resnet_goes_register_prune_lineage_verify_gate(resnet_store, monkeypatch):
    import mlflow
    from mlflow_helpers import invoke

    from mlflow_selprune.registry import lineage
    from mlflow_selprune.registry.loading import load_components
    from mlflow_selprune.registry.resolve import resolve

    monkeypatch.chdir(resnet_store["root"])
    out = invoke("register", resnet_store["model"], "--name", "tiny-resnet", "--alias", "base")
    assert out.exit_code == 0, out.stderr
    out = invoke(
        "prune",
        "--model-uri",
        "models:/tiny-resnet@base",
        "--forget",
        resnet_store["saved"],
        "--forget-classes",
        "two",
        "--ff-frac",
        "0.1",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--no-progress",
    )
    assert out.exit_code == 0, out.stderr
    uri = out.stdout.strip().splitlines()[-1].split()[1]
    assert uri == "models:/tiny-resnet/2"
    tags = resolve(uri).tags
    model, image_processor = load_components(resolve(uri))
    arch = find_architecture(model)
    assert int(tags[lineage.FF_PRUNED]) == int(pruned_columns(arch, "ff").sum()) == 2 * round(0.1 * (16 + 32))
    assert lineage.weights_sha256(model) == tags[lineage.WEIGHTS_SHA]
    assert lineage.METRIC_PREFIX + "control_forget_top1_drop" in tags
    out = invoke("lineage", uri, "--verify")
    assert out.exit_code == 0, out.stdout + out.stderr
    assert "weights: verified" in out.stdout
    out = invoke("gate", "--model-uri", uri, "--max-retain-drop", "1.0", "--set-alias", "unlearned")
    assert out.exit_code == 0, out.stdout + out.stderr
    assert str(mlflow.MlflowClient().get_model_version_by_alias("tiny-resnet", "unlearned").version) == "2"


@pytest.mark.slow(seconds=15)
def test_attention_flag_on_a_registered_resnet_exits_2_before_any_run(resnet_store, monkeypatch):
    import mlflow
    from mlflow_helpers import invoke

    monkeypatch.chdir(resnet_store["root"])
    client = mlflow.MlflowClient()
    runs_before = [r.info.run_id for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    out = invoke(
        "prune",
        "--model-uri",
        resnet_store["model"],
        "--forget",
        resnet_store["saved"],
        "--forget-classes",
        "two",
        "--attn-frac",
        "0.1",
        "--register-as",
        "never",
        "--no-progress",
    )
    assert out.exit_code == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--attn-frac" in errors[0], out.stderr
    runs_after = [r.info.run_id for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert runs_after == runs_before


# ----------------------------------------------------------------------------- the CNN demos


@pytest.mark.slow(seconds=45)
@pytest.mark.parametrize("arch", ["resnet", "convnext"])
def test_the_cnn_demo_commands_pass_their_gates(arch, tmp_path):
    """`mlflow-selprune demo --vision --arch ARCH` as docs/vision-and-masked-lms.md prints it, in an empty
    directory: trains, registers, forgets digit 3, passes its gate and points @unlearned at the result."""
    from mlflow.tracking import MlflowClient

    from mlflow_helpers import recorded
    from mlflow_selprune.demo_cnn import CNN_RECIPES

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run(
        [shutil.which("mlflow-selprune"), "demo", "--vision", "--arch", arch],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    recipe = CNN_RECIPES[arch]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    unlearned = recorded(client.get_model_version_by_alias(recipe.model_name, "unlearned"), client.tracking_uri)
    min_forget, max_retain, min_selectivity = recipe.gate
    # the gate's own thresholds (from the worst case over seeds x thread counts), nothing stricter
    assert float(unlearned.tags["selprune.metric.forget_top1_drop"]) >= min_forget
    assert float(unlearned.tags["selprune.metric.retain_top1_drop"]) <= max_retain
    assert float(unlearned.tags["selprune.metric.selectivity"]) >= min_selectivity


@pytest.mark.slow(seconds=15)
def test_the_margin_benchmark_measures_a_cnn_recipe(tmp_path):
    """examples/benchmarks/vision_demo_margins.py --arch (what the CNN gates were set from) runs and reports the
    worst case; a short training keeps it quick."""
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "benchmarks" / "vision_demo_margins.py"
    out = subprocess.run(
        [sys.executable, str(script), "--arch", "convnext", "--seeds", "0", "--threads", "1", "--train-steps", "20"]
        + ["--steps", "1", "--cache", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"arch": "convnext"' in out.stdout and '"steps": 1' in out.stdout
    assert "worst over 1 runs: forget top-1 drop" in out.stdout
    assert "points lost" in out.stdout
