"""Architecture discovery and weight surgery on every model family of the zoo.

Each family is a tiny model built from its config (never downloaded). For each
one: the discovered projections have the widths the config implies; surgery
zeroes exactly the chosen input columns and nothing else; a pruned neuron no
longer influences the output; and a pruned model saved with
``save_pretrained`` reloads with bit-identical logits.
"""

import copy

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from mlflow_selprune import UnsupportedArchitectureError, find_architecture, prune, prune_neurons
from mlflow_selprune.engine.surgery import pruned_columns
from model_zoo import FAMILIES

FAMILY_NAMES = sorted(FAMILIES)


def build(name: str, seed: int = 0) -> PreTrainedModel:
    config, cls = FAMILIES[name]
    torch.manual_seed(seed)
    model = cls(copy.deepcopy(config)).eval()
    # Random init leaves biases at 0 in most families; give every parameter
    # some signal so "nothing else changed" and bias handling are really tested.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def token_ids(seed: int = 0, shape=(2, 12)) -> torch.Tensor:
    # ids >= 4 avoid every family's special ids (RoBERTa's padding_idx is 1)
    return torch.randint(4, 128, shape, generator=torch.Generator().manual_seed(seed))


def expected_d_mlp(config) -> int:
    for name in ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return 4 * config.hidden_size


def expected_d_attn(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    if not isinstance(head_dim, int):
        head_dim = config.hidden_size // config.num_attention_heads
    return config.num_attention_heads * head_dim


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def some_mask(shape, seed: int, per_layer: int = 3) -> torch.Tensor:
    """A mask with ``per_layer`` distinct neurons in every layer (neuron 5 always in layer 0)."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(shape, dtype=torch.bool)
    for layer in range(shape[0]):
        mask[layer, torch.randperm(shape[1], generator=generator)[:per_layer]] = True
    mask[0, 5] = True
    return mask


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_discovery_finds_every_layer_with_config_widths(family):
    model = build(family)
    config = model.config
    arch = find_architecture(model)
    assert arch.model_class == type(model).__name__
    assert arch.n_layers == config.num_hidden_layers == len(arch.attn)
    assert arch.d_mlp == expected_d_mlp(config)
    assert arch.d_attn == expected_d_attn(config)
    assert arch.shape("ff") == (config.num_hidden_layers, expected_d_mlp(config))
    assert arch.shape("attn") == (config.num_hidden_layers, expected_d_attn(config))
    seen = set()
    for layer in range(arch.n_layers):
        for projection, width in ((arch.ff[layer], arch.d_mlp), (arch.attn[layer], arch.d_attn)):
            assert projection.layer == layer
            assert model.get_submodule(projection.name) is projection.module
            assert f".{layer}." in projection.name
            # [out, in] view: out = model width, in = the neurons
            assert tuple(projection.columns().shape) == (config.hidden_size, width)
            seen.add(id(projection.module))
    assert len(seen) == 2 * arch.n_layers, "every layer needs its own two projections"
    described = arch.describe()
    assert described["d_mlp"] == arch.d_mlp and described["n_layers"] == arch.n_layers


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("kind", ["ff", "attn"])
def test_surgery_zeroes_exactly_the_chosen_columns(family, kind):
    model = build(family)
    arch = find_architecture(model)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    mask = some_mask(arch.shape(kind), seed=1)
    undo = prune_neurons(arch, kind, mask)
    after = model.state_dict()

    expected = {name: value.clone() for name, value in before.items()}
    for projection, layer_mask in zip(arch.projections(kind), mask):
        weight = expected[f"{projection.name}.weight"]
        index = layer_mask.nonzero().squeeze(1)
        if isinstance(projection.module, Conv1D):  # stored [in, out]: a neuron is a row
            assert weight.shape[0] == arch.n_neurons(kind)
            assert (weight[index] != 0).any(dim=1).all(), "the test needs non-zero weights to start with"
            weight[index, :] = 0
        else:  # nn.Linear stores [out, in]: a neuron is a column
            assert weight.shape[1] == arch.n_neurons(kind)
            assert (weight[:, index] != 0).any(dim=0).all(), "the test needs non-zero weights to start with"
            weight[:, index] = 0
    assert after.keys() == expected.keys()
    changed = [name for name in after if not torch.equal(after[name], before[name])]
    assert sorted(changed) == sorted(f"{p.name}.weight" for p in arch.projections(kind))
    for name in after:
        assert torch.equal(after[name], expected[name]), name
    assert torch.equal(pruned_columns(arch, kind), mask)

    undo.restore()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"undo did not restore {name}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("kind", ["ff", "attn"])
def test_pruned_neuron_no_longer_affects_the_output(family, kind):
    model = build(family)
    arch = find_architecture(model)
    ids = token_ids()
    projection = arch.projections(kind)[0]
    mask = some_mask(arch.shape(kind), seed=2)
    pruned_neuron = 5  # some_mask always includes neuron 5 of layer 0
    kept_neuron = int((~mask[0]).nonzero()[0])

    def perturbed_logits(neuron):
        def perturb(module, args):
            x = args[0].clone()
            x[..., neuron] += 50.0
            return (x,) + tuple(args[1:])

        handle = projection.module.register_forward_pre_hook(perturb)
        try:
            return logits(model, ids)
        finally:
            handle.remove()

    clean = logits(model, ids)
    assert (perturbed_logits(pruned_neuron) - clean).abs().max() > 1e-3, "an unpruned neuron must influence the logits"
    prune_neurons(arch, kind, mask)
    pruned = logits(model, ids)
    assert not torch.equal(pruned, clean), "pruning must change the model"
    assert torch.equal(perturbed_logits(pruned_neuron), pruned), "a pruned neuron's activation still reaches the output"
    assert (perturbed_logits(kept_neuron) - pruned).abs().max() > 1e-3, "neurons left alone must still matter"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_save_and_reload_gives_identical_logits(family, tmp_path):
    model = build(family)
    arch = find_architecture(model)
    prune_neurons(arch, "ff", some_mask(arch.shape("ff"), seed=3, per_layer=6))
    prune_neurons(arch, "attn", some_mask(arch.shape("attn"), seed=4, per_layer=4))
    ids = token_ids(seed=5)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, ids), expected)
    arch_reloaded = find_architecture(reloaded)
    assert torch.equal(pruned_columns(arch_reloaded, "ff"), pruned_columns(arch, "ff"))
    assert torch.equal(pruned_columns(arch_reloaded, "attn"), pruned_columns(arch, "attn"))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_one_prune_step_runs_on_every_family(family):
    """The full loop (statistics hooks with padding, scoring, selection, surgery) on every family."""
    model = build(family)
    arch = find_architecture(model)
    ids = token_ids(seed=6, shape=(4, 10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # right padding
    forget = [{"input_ids": ids[:2], "attention_mask": mask[:2]}]
    retain = [{"input_ids": ids[2:], "attention_mask": mask[2:]}]
    result = prune(model, forget, retain, ff_frac=0.1, attn_frac=0.1, steps=1, progress=False)
    k_ff = round(0.1 * arch.n_layers * arch.d_mlp)
    k_attn = round(0.1 * arch.n_layers * arch.d_attn)
    assert result.ff_mask.shape == arch.shape("ff") and result.attn_mask.shape == arch.shape("attn")
    assert result.ff_pruned == k_ff and result.attn_pruned == k_attn
    assert torch.equal(pruned_columns(arch, "ff"), result.ff_mask)
    assert torch.equal(pruned_columns(arch, "attn"), result.attn_mask)


# --- models selective pruning cannot handle ------------------------------------------------------


class _NoProjectionConfig(PretrainedConfig):
    model_type = "selprune-test-no-projection"

    def __init__(self, vocab_size=16, hidden_size=8, num_hidden_layers=2, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        super().__init__(**kwargs)


class _NormOnlyBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm_1 = nn.LayerNorm(width)
        self.norm_2 = nn.LayerNorm(width)

    def forward(self, x):
        return self.norm_2(self.norm_1(x))


class NormOnlyModel(PreTrainedModel):
    """Embedding + blocks that hold nothing but LayerNorms: no projections to prune."""

    config_class = _NoProjectionConfig
    base_model_prefix = "norm_only"

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(_NormOnlyBlock(config.hidden_size) for _ in range(config.num_hidden_layers))
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, input_ids, **kwargs):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return x


def test_blocks_without_projections_raise_unsupported_naming_the_class():
    model = NormOnlyModel(_NoProjectionConfig())
    with pytest.raises(UnsupportedArchitectureError, match="NormOnlyModel"):
        find_architecture(model)
    # the error is also a ValueError, so generic bad-input handling catches it
    assert issubclass(UnsupportedArchitectureError, ValueError)


def test_prune_rejects_unsupported_model_naming_the_class():
    model = NormOnlyModel(_NoProjectionConfig())
    batch = [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}]
    with pytest.raises(UnsupportedArchitectureError, match="NormOnlyModel"):
        prune(model, batch, batch, steps=1, progress=False)


def test_plain_module_is_a_type_error():
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 32), nn.Linear(32, 8))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        find_architecture(model)


def test_a_model_kind_not_handled_is_refused_not_scored_as_a_causal_lm(tiny_tokenizer):
    """A token classifier has FF and attention neurons, but no metric defined here: refused with one line
    before any data is prepared."""
    import transformers as T

    from mlflow_selprune.errors import BadInputError
    from mlflow_selprune.kinds import CAUSAL_LM, SEQUENCE_CLASSIFIER, kind_of_class, model_kind
    from mlflow_selprune.unlearn import load_datasets

    model = T.BertForTokenClassification(
        T.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    )
    with pytest.raises(BadInputError, match="BertForTokenClassification is not a model kind"):
        model_kind(model)
    with pytest.raises(BadInputError, match="not a model kind"):
        load_datasets(tiny_tokenizer, "builtin:stdlib-code", "builtin:stdlib-prose", sp_data(), model=model)
    assert kind_of_class("GPT2LMHeadModel") == kind_of_class("LlamaForCausalLM") == CAUSAL_LM
    assert kind_of_class("BertForSequenceClassification") == SEQUENCE_CLASSIFIER


def sp_data():
    from mlflow_selprune import DataOptions

    return DataOptions(collect_tokens=100, eval_tokens=100)
