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


SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece_tokenizer(texts, vocab_size: int = 400):
    """A BERT-style WordPiece tokenizer ([CLS] text [SEP], with [MASK] and [PAD]) trained offline on ``texts``.
    The tokenizers library's trainer breaks ties in hash order, so its vocabulary differs from process to
    process: where a threshold depends on the model trained on it, use ``whole_word_tokenizer``."""
    from tokenizers import Tokenizer, models, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    _bert_pieces(tok)
    tok.train_from_iterator(
        texts,
        trainer=trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False),
    )
    return _bert_tokenizer(tok)


def whole_word_tokenizer(texts, vocab_size: int = 400):
    """The same kind of tokenizer with a vocabulary that is the same in every process: the special tokens,
    every character (alone and as a ``##`` continuation), then whole words by frequency, ties by spelling, up
    to ``vocab_size``."""
    from collections import Counter

    from tokenizers import Tokenizer, models

    pieces = _bert_pieces(Tokenizer(models.WordPiece(unk_token="[UNK]")))
    counts = Counter(
        word
        for text in texts
        for word, _ in pieces.pre_tokenizer.pre_tokenize_str(pieces.normalizer.normalize_str(text))
    )
    characters = sorted({c for word in counts for c in word})
    vocab = SPECIAL_TOKENS + characters + ["##" + c for c in characters]
    words = [w for w, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if len(w) > 1]
    vocab += words[: max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece(vocab={token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    return _bert_tokenizer(_bert_pieces(tok))


def _bert_pieces(tok):
    """BERT's lower-casing normalizer, pre-tokenizer and WordPiece decoder on ``tok``."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def _bert_tokenizer(tok):
    """``tok`` as a transformers tokenizer with BERT's special tokens and [CLS] ... [SEP] template."""
    from tokenizers import processors

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
