"""Loading a teacher's config and tokenizer, and naming what is wrong when they do not load."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from nexus_core.errors import BadInputError
from nexus_core.records.registry import Teacher


class TeacherLoadError(BadInputError):
    """Raised when a teacher's config, weights or tokenizer cannot be loaded; the message says what to fix."""


def load_config(teacher: Teacher):
    try:
        return config_from(teacher.path, teacher.trust_remote_code)
    except BadInputError:
        raise
    except Exception as exc:  # transformers raises ValueError/OSError/KeyError for these
        what = "GGUF metadata" if str(teacher.path).endswith(".gguf") else "config.json"
        raise TeacherLoadError(_explain(teacher, what, exc)) from None


def config_from(path, trust_remote_code: bool = False):
    """A model folder's config.json, or the config a GGUF file's metadata describes."""
    from transformers import AutoConfig

    from nexus_core.teachers import gguf

    file = gguf.gguf_file(Path(path))
    if file is not None:
        return gguf.load_config(file)
    return language_model_config(AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code), path)


# Language models of vision-language teachers that transformers builds only inside the multimodal model:
# model_type -> (the text model that computes the same thing on text, config fields the multimodal text model
# hard-codes). Their multimodal RoPE is plain RoPE on text alone (the three position components are equal,
# whatever mrope_section or interleaving), so Qwen3-VL runs as Qwen3 and Qwen2.5-VL as Qwen2 (q/k/v biases,
# no qk norm, like Qwen2); Qwen3-VL-MoE's router always renormalises its top-k weights, which Qwen3-MoE does
# with norm_topk_prob. tests/test_vision_language.py checks each against the multimodal model's own forward.
TEXT_AS = {"qwen3_vl_text": ("qwen3", {}), "qwen2_5_vl_text": ("qwen2", {}),
           "qwen3_vl_moe_text": ("qwen3_moe", {"norm_topk_prob": True})}


def _as_text_model(text):
    from transformers import CONFIG_MAPPING

    model_type, fixed = TEXT_AS[text.model_type]
    target = CONFIG_MAPPING[model_type]
    # head_dim too: attention modules read it whenever a config sets it, declared or not (Qwen3-MoE's is not,
    # and its fallback hidden_size // heads is 64 where Qwen3-VL-30B-A3B's is 128)
    known = set(target().to_dict()) | {"head_dim"}
    src = {k: v for k, v in text.to_dict().items() if k in known and k not in ("model_type", "architectures")}
    rope = src.get("rope_parameters")
    if isinstance(rope, dict):  # the multimodal sections mean nothing without images
        src["rope_parameters"] = {k: v for k, v in rope.items() if not k.startswith("mrope")}
    return target(**{**src, **fixed})


def language_model_config(config, path=""):
    """A vision-language teacher's config -> its language model's (Gemma 3, LLaVA, Mistral 3): the teacher is
    distilled on text, so only the language model is built, loaded or streamed, never the vision tower.
    Qwen3-VL's, Qwen2.5-VL's and Qwen3-VL-MoE's language models run as the text model TEXT_AS names, Step3-VL's
    as Nexus's own causal LM around transformers' text model (teachers/text_models.py). Any other config is
    returned as it is; a vision-language model whose language model transformers cannot build as a causal LM
    on its own is refused with that sentence."""
    import copy

    from transformers import AutoModelForCausalLM

    from nexus_core.teachers import text_models

    text = config.get_text_config()
    if text is config:
        return config
    if text.model_type in text_models.CAUSAL_LM:
        text_models.register(text.model_type)
    if type(text) not in AutoModelForCausalLM._model_mapping and text.model_type in TEXT_AS:
        text = _as_text_model(text)
    if type(text) not in AutoModelForCausalLM._model_mapping:
        raise TeacherLoadError(
            f"{path}: {type(config).__name__} is a vision-language model whose language model "
            f"({text.model_type}) transformers cannot build as a text-only causal LM, so Nexus cannot distil it "
            f"yet; use its language model saved on its own (a text-only checkpoint) as the teacher")
    text = copy.deepcopy(text)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(text, key, None) is None and getattr(config, key, None) is not None:
            setattr(text, key, getattr(config, key))
    if getattr(config, "tie_word_embeddings", None) is not None:  # the multimodal model ties its head by its own
        text.tie_word_embeddings = config.tie_word_embeddings      # flag (Qwen3-VL-MoE's text config says True)
    return text


def load_model(teacher: Teacher, dtype):
    """The whole teacher as an AutoModelForCausalLM (safetensors via from_pretrained, or GGUF), eval mode;
    TeacherLoadError naming what does not match when config and weights disagree."""
    from transformers import AutoModelForCausalLM

    from nexus_core.teachers import gguf

    try:
        file = gguf.gguf_file(Path(teacher.path))
        if file is not None:
            return gguf.load_model(file, dtype, load_config(teacher))
        config = load_config(teacher)
        if is_block_fp8(config) or _quant_method(config) == "mxfp4" or _language_model_only(teacher.path):
            return _load_from_store(teacher, config, dtype)
        model, info = AutoModelForCausalLM.from_pretrained(
            teacher.path, dtype=dtype, use_safetensors=True, trust_remote_code=teacher.trust_remote_code,
            output_loading_info=True)
    except BadInputError:  # TeacherLoadError, GGUFError: already say what to fix
        raise
    except Exception as exc:
        raise TeacherLoadError(_explain(teacher, "weights", exc)) from None
    problems = {k: sorted(v)[:5] for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if problems:
        raise TeacherLoadError(f"teacher {teacher.teacher_id!r} ({teacher.path}): config.json does not match the "
                               f"weights ({problems}); fix config.json or re-save the model")
    return model.eval()


def is_block_fp8(config) -> bool:
    """DeepSeek-V3/R1's release format: quantization_config fp8 with a weight_block_size (weight_scale_inv)."""
    return _quant_method(config) == "fp8" and bool(_quant(config).get("weight_block_size"))


def _quant(config) -> dict:
    q = getattr(config, "quantization_config", None)
    return q if isinstance(q, dict) else (q.to_dict() if q is not None else {})


def _quant_method(config) -> str:
    return str(_quant(config).get("quant_method", "")).lower()


def _language_model_only(path) -> bool:
    from nexus_core.teachers.weights import SafetensorsStore

    return SafetensorsStore(Path(path)).language_model_only


def _load_from_store(teacher: Teacher, config, dtype):
    """The whole model from the tensors Nexus's weight store reads, loaded through transformers' own key
    conversions: block-FP8 dequantised (DeepSeek's formula, partial edge blocks included) and gpt-oss's MXFP4
    experts into `dtype`, and a vision-language checkpoint's language model alone (config is already the text
    config).

    transformers' CPU fallback for FP8 infers the block from the scale grid (rows // scale rows), which is
    wrong for any weight whose side is not a multiple of 128 (DeepSeek-V3's kv_a_proj_with_mqa has 576 rows)."""
    import copy

    from transformers import AutoModelForCausalLM

    from nexus_core.teachers.weights import SafetensorsStore

    store = SafetensorsStore(Path(teacher.path))
    with store.reading() as read:
        state = {k: read(k).to(dtype) for k in store.meta.tensors}
    plain = copy.deepcopy(config)
    if hasattr(plain, "quantization_config"):
        del plain.quantization_config  # the weights are dequantised: nothing for transformers to quantise
    cls = AutoModelForCausalLM._model_mapping[type(plain)]
    model, info = cls.from_pretrained(None, config=plain, state_dict=state, dtype=dtype, output_loading_info=True)
    problems = {k: sorted(v)[:5] for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if problems:
        raise TeacherLoadError(f"teacher {teacher.teacher_id!r} ({teacher.path}): config.json does not match the "
                               f"weights ({problems}); fix config.json or re-save the model")
    return model.eval()


def tokenizer_from(path, trust_remote_code: bool = False):
    """The tokenizer a model folder saved, exactly (or the one a GGUF file's metadata describes).

    transformers 5 maps some model types to their own tokenizer class (qwen2 -> Qwen2Tokenizer)
    and rebuilds the pre-tokenizer, ignoring a saved generic tokenizer.json: the teacher would
    then be fed other ids than it was trained on. A folder whose tokenizer_config names the
    generic class is therefore loaded as exactly that file.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from nexus_core.teachers import gguf

    file = gguf.gguf_file(Path(path))
    if file is not None:
        return gguf.load_tokenizer(file)
    cfg_file, tok_file = Path(path) / "tokenizer_config.json", Path(path) / "tokenizer.json"
    if tok_file.exists() and cfg_file.exists():
        try:
            declared = json.loads(cfg_file.read_text()).get("tokenizer_class")
        except ValueError:
            declared = None
        if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def load_tokenizer(teacher: Teacher):
    try:
        return tokenizer_from(teacher.path, teacher.trust_remote_code)
    except Exception as exc:
        raise TeacherLoadError(_explain(teacher, "tokenizer", exc)) from None


def tokenizer_vocab(tokenizer) -> int:
    """Ids the tokenizer can produce (base vocabulary + added tokens)."""
    return len(tokenizer)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id) and the special tokens with their ids."""
    special = {name: str(tok) for name, tok in sorted(tokenizer.special_tokens_map.items())}
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0])),
        "special": special,
        "special_ids": sorted(tokenizer.all_special_ids),
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()


def _explain(teacher: Teacher, what: str, exc: Exception) -> str:
    text = str(exc)
    where = f"teacher {teacher.teacher_id!r} ({teacher.path})"
    if "trust_remote_code" in text or "auto_map" in text:
        return (f"{where}: its {what} needs custom modelling code from the model folder; "
                f"set \"trust_remote_code\": true in its registry JSON only if you trust that code")
    if "size mismatch" in text or "mismatch" in text.lower():
        return f"{where}: config.json does not match the weights ({text[:300]}); fix config.json or re-save the model"
    return f"{where}: cannot load its {what} ({type(exc).__name__}: {text[:300]}); check the model folder's files"


# --- config.json against the weights, from the safetensors headers alone -----------------------

_EMBED_SUFFIXES = ("embed_tokens.weight", "embed_in.weight", "wte.weight", "word_embeddings.weight")
_HEAD_SUFFIXES = ("lm_head.weight", "embed_out.weight")
_LAYER_KEY = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_NOT_TEXT = ("vision", "visual", "audio", "image", "mm_projector", "multi_modal", "patch_embed")


def check_against_weights(teacher: Teacher, config, meta) -> int:
    """config.json's sizes against the tensors' shapes, before any weight is allocated (an absurd config
    would otherwise build a million layers or ask for 256 GB). Returns the LM head's rows; raises
    TeacherLoadError naming the config field that does not match."""
    tcfg = config.get_text_config()
    where = f"teacher {teacher.teacher_id!r} ({teacher.path})"
    fix = "fix config.json or re-save the model"
    # 1. Layer count: the weights must hold every layer config.json asks for (extra ones, such as
    #    DeepSeek-V3's multi-token-prediction layer, are simply not run).
    text_keys = [k for k in meta.tensors if not any(w in k for w in _NOT_TEXT)]
    stored = {int(m.group(1)) for k in text_keys if (m := _LAYER_KEY.search(k))}
    L = int(tcfg.num_hidden_layers)
    if stored and L > len(stored):
        raise TeacherLoadError(f"{where}: config.json says num_hidden_layers={L} but the weights hold "
                               f"{len(stored)} decoder layers; {fix}")
    # 2. Embedding (vocab_size x hidden_size).
    embed = next((t for s in _EMBED_SUFFIXES if (t := meta.find(s))), None)
    head = next((t for s in _HEAD_SUFFIXES if (t := meta.find(s))), None)
    if embed is not None and tuple(embed.shape) != (tcfg.vocab_size, tcfg.hidden_size):
        raise TeacherLoadError(f"{where}: config.json says vocab_size={tcfg.vocab_size}, hidden_size="
                               f"{tcfg.hidden_size} but the embedding in the weights is {list(embed.shape)}; {fix}")
    # 3. Every parameter of the first decoder layer, as config.json would build it (on the meta device:
    #    nothing is allocated), against the stored tensor of the same name.
    for name, shape, stored_shape in _layer0_mismatches(config, meta, text_keys):
        fields = _fields_in(tcfg, set(shape) - set(stored_shape)) or ["its sizes"]
        raise TeacherLoadError(f"{where}: config.json {', '.join(fields)} gives {name} the shape {list(shape)}, "
                               f"but the weights hold {list(stored_shape)}; {fix}")
    return int((head or embed).shape[0]) if (head or embed) else int(tcfg.vocab_size)


def _layer0_mismatches(config, meta, text_keys: list[str]):
    """(parameter name, shape config.json gives it, stored shape) for layer 0's parameters that differ."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    small = copy.deepcopy(config)
    text = small.get_text_config()
    types = getattr(text, "layer_types", None)
    text.num_hidden_layers = 1
    if isinstance(types, list) and types:
        text.layer_types = types[:1]
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(small)
    except Exception:  # an architecture that cannot be built this way: the load itself reports it
        return
    by_suffix = {}
    for k in text_keys:
        m = _LAYER_KEY.search(k)
        if m and m.group(1) == "0":
            by_suffix[k[m.start():].lstrip(".")] = k
    for name, p in model.named_parameters():
        m = _LAYER_KEY.search(name)
        if not m or m.group(1) != "0":
            continue
        key = by_suffix.get(name[m.start():].lstrip("."))
        if key is not None and tuple(meta.tensors[key].shape) != tuple(p.shape):
            yield name, tuple(p.shape), tuple(meta.tensors[key].shape)


def _fields_in(tcfg, values: set[int]) -> list[str]:
    """config fields (as `name=value`) whose integer value is one of `values`."""
    return sorted(f"{k}={v}" for k, v in tcfg.to_dict().items() if type(v) is int and v in values and v > 1)
