"""Tiny configs of every model family the engine must support: built from configs, never downloaded."""

import transformers as T

FAMILIES = {
    "gpt2": (T.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64), T.GPT2LMHeadModel),
    "gpt_neox": (
        T.GPTNeoXConfig(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        T.GPTNeoXForCausalLM,
    ),
    "opt": (
        T.OPTConfig(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=64,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        ),
        T.OPTForCausalLM,
    ),
    "llama": (
        T.LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        T.LlamaForCausalLM,
    ),
    "mistral": (
        T.MistralConfig(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        T.MistralForCausalLM,
    ),
    "qwen2": (
        T.Qwen2Config(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        T.Qwen2ForCausalLM,
    ),
    "gptj": (
        T.GPTJConfig(vocab_size=128, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64),
        T.GPTJForCausalLM,
    ),
    "phi": (
        T.PhiConfig(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        T.PhiForCausalLM,
    ),
    "bert": (
        T.BertConfig(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        T.BertForMaskedLM,
    ),
    "roberta": (
        T.RobertaConfig(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=70,
            pad_token_id=1,
        ),
        T.RobertaForMaskedLM,
    ),
    "gemma": (
        T.GemmaConfig(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        T.GemmaForCausalLM,
    ),
    "falcon": (
        T.FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        T.FalconForCausalLM,
    ),
    "bloom": (T.BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4), T.BloomForCausalLM),
}


def wordpiece_tokenizer(texts, vocab_size: int = 400):
    """A BERT-style WordPiece tokenizer ([CLS] text [SEP], with [MASK] and [PAD]) trained offline on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        texts, trainer=trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        padding_side="right",
    )


def tiny_masked_lm(tokenizer, family: str = "bert", seed: int = 0):
    """A tiny BERT or RoBERTa masked LM whose vocabulary matches ``tokenizer``."""
    import torch

    torch.manual_seed(seed)
    config, cls = FAMILIES[family]
    config = type(config)(
        **{
            **config.to_dict(),
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "max_position_embeddings": 130,
            "bos_token_id": tokenizer.cls_token_id,
            "eos_token_id": tokenizer.sep_token_id,
        }
    )
    return cls(config).eval()
