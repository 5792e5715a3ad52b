"""Tiny configs of every model family the engine must support: built from configs, never downloaded."""
import transformers as T
FAMILIES = {
 "gpt2": (T.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64), T.GPT2LMHeadModel),
 "gpt_neox": (T.GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64), T.GPTNeoXForCausalLM),
 "opt": (T.OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32), T.OPTForCausalLM),
 "llama": (T.LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64), T.LlamaForCausalLM),
 "mistral": (T.MistralConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64), T.MistralForCausalLM),
 "qwen2": (T.Qwen2Config(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64), T.Qwen2ForCausalLM),
 "gptj": (T.GPTJConfig(vocab_size=128, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64), T.GPTJForCausalLM),
 "phi": (T.PhiConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64), T.PhiForCausalLM),
 "bert": (T.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64), T.BertForMaskedLM),
 "roberta": (T.RobertaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=70, pad_token_id=1), T.RobertaForMaskedLM),
 "gemma": (T.GemmaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16, intermediate_size=64, max_position_embeddings=64), T.GemmaForCausalLM),
 "falcon": (T.FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4), T.FalconForCausalLM),
 "bloom": (T.BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4), T.BloomForCausalLM),
}
