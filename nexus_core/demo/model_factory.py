"""Small models and tokenizers made locally: demo teachers, test teachers, benchmark teachers.

Nothing is downloaded: the tokenizer is trained on the given texts with `tokenizers`,
and the model is an ordinary `transformers` causal LM built from a config.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
ARCHS = ("llama", "mistral", "qwen2", "gemma", "gpt_neox", "mixtral")
# Architectures users arrive with (tests/test_teacher_families.py): the MoE ones seed a dense student.
FAMILIES = ("qwen3_moe", "deepseek_v3", "gemma3_text", "phi3", "gpt_oss")


def train_tokenizer(texts: list[str], vocab_size: int = 512, algorithm: str = "bpe", add_bos: bool = False):
    """A byte-level BPE (or unigram) tokenizer trained on `texts`, as a PreTrainedTokenizerFast.

    add_bos: its post-processor puts <s> before every text, as Gemma's and Llama 3's do (SmolLM2's and
    GPT-2's add nothing, the default)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if algorithm == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
    elif algorithm == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                          unk_token="<unk>", show_progress=False)
    else:
        raise ValueError(f"unknown tokenizer algorithm {algorithm!r}")
    tok.train_from_iterator(texts, trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 4, heads: int = 4,
                kv_heads: int = 2, intermediate: int | None = None, max_pos: int = 512,
                experts: int = 4, experts_per_tok: int = 2, tokenizer=None, **extra):
    """An HF config for one of ARCHS or FAMILIES, sized by the arguments (MoE experts: `intermediate` wide)."""
    import transformers as tf

    inter = intermediate or hidden * 2
    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, intermediate_size=inter,
                  max_position_embeddings=max_pos, tie_word_embeddings=False, **ids)
    if arch == "llama":
        cfg = tf.LlamaConfig(num_key_value_heads=kv_heads, **common)
    elif arch == "mistral":
        cfg = tf.MistralConfig(num_key_value_heads=kv_heads, sliding_window=None, **common)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(num_key_value_heads=kv_heads, **common)
    elif arch == "gemma":
        cfg = tf.GemmaConfig(num_key_value_heads=kv_heads, head_dim=hidden // heads, **common)
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(**common)
    elif arch == "mixtral":
        cfg = tf.MixtralConfig(num_key_value_heads=kv_heads, num_local_experts=experts,
                               num_experts_per_tok=experts_per_tok, **common)
    elif arch in FAMILIES:
        cfg = _family_config(arch, common, hidden, heads, kv_heads, inter, experts, experts_per_tok)
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHS + FAMILIES}")
    for k, v in extra.items():
        setattr(cfg, k, v)
    return cfg


def _family_config(arch: str, common: dict, hidden: int, heads: int, kv_heads: int, inter: int, experts: int,
                   experts_per_tok: int):
    """Tiny configs of the released families: every distinctive feature on (MLA, shared experts, group-limited
    routing and dense first layers for DeepSeek-V3; interleaved sliding/global layers for Gemma 3 and gpt-oss)."""
    import transformers as tf

    head_dim = hidden // heads
    layers = common["num_hidden_layers"]
    if arch == "qwen3_moe":  # dense `intermediate_size` = experts_per_tok experts, as in Qwen3-30B-A3B
        return tf.Qwen3MoeConfig(num_key_value_heads=kv_heads, head_dim=head_dim, num_experts=experts,
                                 num_experts_per_tok=experts_per_tok, moe_intermediate_size=inter,
                                 norm_topk_prob=True, **{**common, "intermediate_size": inter * experts_per_tok})
    if arch == "deepseek_v3":  # dense width = shared + routed experts per token, as in DeepSeek-V3
        return tf.DeepseekV3Config(num_key_value_heads=heads, n_routed_experts=experts, n_shared_experts=1,
                                   num_experts_per_tok=experts_per_tok, n_group=2, topk_group=1,
                                   first_k_dense_replace=1, moe_intermediate_size=inter, kv_lora_rank=16,
                                   q_lora_rank=24, qk_rope_head_dim=head_dim, qk_nope_head_dim=head_dim,
                                   v_head_dim=head_dim, routed_scaling_factor=2.5,
                                   **{**common, "intermediate_size": inter * (experts_per_tok + 1)})
    if arch == "gemma3_text":
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
        return tf.Gemma3TextConfig(num_key_value_heads=kv_heads, head_dim=head_dim, sliding_window=4,
                                   layer_types=types, query_pre_attn_scalar=head_dim, **common)
    if arch == "phi3":
        return tf.Phi3Config(num_key_value_heads=kv_heads, **common)
    # gpt_oss: experts with biases and a clamped SwiGLU, attention sinks, alternating sliding windows
    types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    return tf.GptOssConfig(num_key_value_heads=kv_heads, head_dim=head_dim, num_local_experts=experts,
                           num_experts_per_tok=experts_per_tok, sliding_window=4, layer_types=types,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common)


def build_model(config, seed: int = 0):
    """A randomly initialised causal LM for `config`, seeded so that it is reproducible."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model


def save_model(model, tokenizer, out_dir: Path, max_shard_size: str | None = None) -> Path:
    """save_pretrained (safetensors only) + tokenizer, into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_teacher(out_dir: Path, texts: list[str], arch: str = "llama", vocab_size: int = 512,
                 seed: int = 0, tokenizer=None, max_shard_size: str | None = None, **sizes) -> Path:
    """One call for tests: train (or reuse) a tokenizer, build a model, save both."""
    tokenizer = tokenizer or train_tokenizer(texts, vocab_size)
    cfg = make_config(arch, vocab_size=len(tokenizer), tokenizer=tokenizer, **sizes)
    model = build_model(cfg, seed=seed)
    return save_model(model, tokenizer, out_dir, max_shard_size=max_shard_size)
