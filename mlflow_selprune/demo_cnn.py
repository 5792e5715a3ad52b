"""The convolutional vision demos: a small ResNet or ConvNeXt trained here on the handwritten digits forgets
digit 3 (``mlflow-selprune demo --vision --arch resnet|convnext``).

The flow, data and split are the ViT demo's (``demo_vision``); only the model differs, and
``recipe_for(arch)`` gives any of the three recipes. The CNN's neurons are the input channels of each ResNet
block's last convolution, or the inputs of each ConvNeXt block's second pointwise Linear
(``engine/convolutional.py``). Each recipe and its gate were measured over 3 seeds x torch
threads 1, 2 and 4 (docs/vision-demo-frontier.md; examples/benchmarks/vision_demo_margins.py --arch ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import PruneConfig
from .demo_vision import RECIPE, VISION_DEMO_MODEL, DigitsRecipe


@dataclass(frozen=True)
class CnnRecipe(DigitsRecipe):
    """A ResNet (``layer_type`` basic or bottleneck) or ConvNeXt of ``depths`` blocks per stage, stage widths
    ``hidden_sizes``, on digits enlarged to ``image_size`` (the stem divides it by 4)."""

    arch: str = "resnet"
    image_size: int = 16
    embedding_size: int = 32
    hidden_sizes: tuple[int, ...] = (32, 64)
    depths: tuple[int, ...] = (1, 1)
    layer_type: str = "basic"
    layer_scale_init_value: float = 1e-6  # ConvNeXt: each block's output scale at initialization
    # the gate: (min forget top-1 drop, max retain top-1 drop, min selectivity), from the measured worst case
    gate_thresholds: tuple[float, float, float] = (0.0, 1.0, 0.0)

    @property
    def model_name(self) -> str:
        return f"{VISION_DEMO_MODEL}-{self.arch}"

    @property
    def gate(self) -> tuple[float, float, float]:
        return self.gate_thresholds

    def build(self, config_fields: dict):
        import transformers

        if self.arch == "resnet":
            resnet = transformers.ResNetConfig(
                embedding_size=self.embedding_size,
                hidden_sizes=list(self.hidden_sizes),
                depths=list(self.depths),
                layer_type=self.layer_type,
                **config_fields,
            )
            return transformers.ResNetForImageClassification(resnet)
        config = transformers.ConvNextConfig(
            hidden_sizes=list(self.hidden_sizes),
            depths=list(self.depths),
            num_stages=len(self.depths),
            drop_path_rate=0.0,
            layer_scale_init_value=self.layer_scale_init_value,
            **config_fields,
        )
        return transformers.ConvNextForImageClassification(config)


# Each gate follows the ViT demo's rule (docs/vision-demo-frontier.md): the minimum forget drop at most 1/2 of
# the worst measured, the maximum retain drop at least 2x the worst measured (a drop under the 1% noise floor
# counting as 1%), the minimum selectivity at most 1/2 of the worst measured; "measured" is seeds 0, 1, 2 x
# torch threads 1, 2, 4 (training and pruning) and seeds 3, 4, 5 at 1 thread.
CNN_RECIPES: dict[str, CnnRecipe] = {
    # one residual block of 256 channels; 10 steps of 2% prune 20% of its input channels. Worst over the 12 runs:
    # forget drop 0.984, retain drop 0.014, selectivity 69.3
    "resnet": CnnRecipe(
        arch="resnet",
        hidden_sizes=(256,),
        depths=(1,),
        prune=PruneConfig(ff_frac=0.02, attn_frac=0.0, steps=10),
        gate_thresholds=(0.49, 0.03, 16.0),
    ),
    # two blocks of width 128 (512 neurons each), each block's output at full scale from the start (at the
    # default 1e-6 the blocks stayed near silent in 600 steps and the stem did the work: pruning them could not
    # forget); 12 steps of 2% prune 24% of the neurons. Worst over the 12 runs: forget drop 0.800, retain drop
    # 0.008, selectivity 80.0
    "convnext": CnnRecipe(
        arch="convnext",
        hidden_sizes=(128,),
        depths=(2,),
        layer_scale_init_value=1.0,
        prune=PruneConfig(ff_frac=0.02, attn_frac=0.0, steps=12),
        gate_thresholds=(0.40, 0.02, 20.0),
    ),
}


def recipe_for(arch: str) -> DigitsRecipe:
    """The vision demo recipe of ``--arch``: the ViT (``demo_vision.RECIPE``) or one of ``CNN_RECIPES``."""
    recipes = {"vit": RECIPE, **CNN_RECIPES}
    if arch not in recipes:
        from .errors import ConfigError

        raise ConfigError(f"--arch {arch}: the vision demo trains one of {', '.join(recipes)}")
    return recipes[arch]
