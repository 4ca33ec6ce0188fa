"""GGUF teachers (llama.cpp's one-file format): their config, tokenizer and tensors.

A GGUF file holds a model's hyper-parameters and tokenizer as metadata and its tensors under llama.cpp's
names (`blk.3.attn_q.weight`), most of them quantised in blocks (Q4_K, Q8_0, ...). The config and the
tokenizer come from transformers' own GGUF support, plus the fixes below for what it drops (RoPE
scaling). The tensors are read by `GGUFStore`, one at a time, from a memory map opened for each
`reading()` block: dequantised with the `gguf` package, then renamed and reshaped by transformers' GGUF
name map and tensor processors (llama's Q/K row permutation, Gemma's norm offset), so that SLI streams
a 70B Q4 file one decoder layer at a time and a full load never holds a second copy of the model.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from nexus_core.errors import BadInputError, CorruptArtifactError
from nexus_core.records.registry import gguf_file
from nexus_core.storage.safetensors_meta import TensorInfo, WeightsMeta

__all__ = ["GGUFError", "GGUFStore", "gguf_file", "load_config", "load_model", "load_tokenizer", "read_header"]


class GGUFError(BadInputError):
    """Raised when a GGUF teacher cannot be read as a transformers model (unsupported tensor type or
    architecture, tensors that do not match its own metadata); the message says what to do."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str                 # llama.cpp's name, e.g. blk.0.attn_q.weight
    qtype: int                # gguf.GGMLQuantizationType value
    shape: tuple[int, ...]    # torch order (GGUF lists dimensions innermost first)
    offset: int               # absolute byte offset of its data in the file
    nbytes: int


@dataclass(frozen=True)
class Header:
    architecture: str
    tensors: dict[str, GGUFTensor]
    scalars: dict[str, object]  # metadata keys with scalar (or short list) values; the tokenizer's arrays left out
    token_count: int = 0        # entries in tokenizer.ggml.tokens


def read_header(file) -> Header:
    """The file's tensor table and scalar metadata (cached per file, size and mtime)."""
    st = Path(file).stat()
    return _header(str(file), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _header(file: str, size: int, mtime_ns: int) -> Header:
    from gguf import GGMLQuantizationType, GGUFReader

    try:
        reader = GGUFReader(file)
    except Exception as exc:  # the reader raises ValueError/struct.error/IndexError on a damaged file
        raise CorruptArtifactError(f"{file}: not a readable GGUF file ({type(exc).__name__}: {exc}); "
                                   "re-download it") from None
    tensors = {t.name: GGUFTensor(t.name, int(t.tensor_type), tuple(int(d) for d in reversed(t.shape.tolist())),
                                  int(t.data_offset), int(t.n_bytes)) for t in reader.tensors}
    scalars = {}
    for key, field in reader.fields.items():
        if len(field.data) <= 64:  # skips tokens/merges/scores: only the tokenizer reads those
            try:
                scalars[key] = field.contents()
            except Exception:  # a value type this gguf release cannot decode: not one we use
                continue
    arch = scalars.get("general.architecture")
    if not isinstance(arch, str):
        raise CorruptArtifactError(f"{file}: GGUF metadata has no general.architecture; re-download it")
    unknown = sorted({GGMLQuantizationType(t.qtype).name for t in tensors.values() if not _can_dequantize(t.qtype)})
    if unknown:
        raise GGUFError(f"{file}: tensor type(s) {', '.join(unknown)} cannot be dequantised by the gguf package; "
                        "use a file quantised as F16/BF16/Q8_0/Q4_0/Q4_1/Q4_K/Q5_K/Q6_K")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    del reader  # its whole-file map: tensors are read through a fresh map per reading() block
    return Header(arch, tensors, scalars, len(tokens.data) if tokens is not None else 0)


def _can_dequantize(qtype: int) -> bool:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize
    from gguf.quants import quant_shape_to_byte_shape

    q = GGMLQuantizationType(qtype)
    if q in _PLAIN:
        return True
    block, _ = GGML_QUANT_SIZES[q]
    try:
        dequantize(np.zeros(quant_shape_to_byte_shape((block,), q), dtype=np.uint8), q)
        return True
    except NotImplementedError:
        return False


_PLAIN = {0: np.float32, 1: np.float16}  # F32, F16: stored as values; everything else as uint8 blocks


# --- config and tokenizer ------------------------------------------------------------------------


def load_config(file):
    """The transformers config the file's metadata describes, with RoPE scaling restored (a fresh copy)."""
    st = Path(file).stat()
    return copy.deepcopy(_config(str(file), st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _config(file: str, size: int, mtime_ns: int):
    from transformers import AutoConfig

    path = Path(file)
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    _restore_rope_scaling(config, read_header(path), path)
    return config


def load_tokenizer(file):
    """The tokenizer the file's metadata describes (vocabulary, merges, special tokens, chat template)."""
    from transformers import AutoTokenizer

    path = Path(file)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    header = read_header(path)
    n = header.token_count
    tok = _without_ids_from(tok, n) if n and len(tok) > n else tok
    if header.scalars.get("tokenizer.ggml.pre") in _DIGITS_FIRST:
        from tokenizers import pre_tokenizers

        # llama.cpp splits every digit off first for these (SmolLM's own tokenizer.json: Digits(individual)
        # then ByteLevel); transformers applies plain GPT-2 splitting, which cuts "  1" into "Ġ","Ġ","1"
        # where the model was trained on "ĠĠ","1" (a third of Python files tokenise differently).
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return tok


# tokenizer.ggml.pre values whose llama.cpp pre-tokenizer is "\p{N}" then GPT-2's regex (llama-vocab.cpp).
_DIGITS_FIRST = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}


def _without_ids_from(tok, n: int):
    """The tokenizer less the added tokens with ids >= n.

    transformers builds a GGUF byte-level tokenizer as a GPT2Tokenizer, whose constructor adds its
    default `<|endoftext|>` when the file's vocabulary lacks it (Llama 3 spells it `<|end_of_text|>`):
    one id past the model's embedding rows, which the profile rejects and an embedding lookup would
    crash on. The file's own tokens, special ones included, are all below n."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tok.backend_tokenizer.to_str())
    dropped = {t["content"] for t in spec["added_tokens"] if t["id"] >= n}
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < n]
    special = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str) and v not in dropped}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   chat_template=tok.chat_template, **special)


def _restore_rope_scaling(config, header: Header, path: Path) -> None:
    """transformers' GGUF config drops RoPE scaling: `<arch>.rope.scaling.*` (linear, yarn) and llama 3.1+'s
    `rope_freqs.weight` (per-frequency divisors). Without it every position gets the wrong rotary
    frequencies, so put it back into config.rope_parameters."""
    text = config.get_text_config()
    params = dict(getattr(text, "rope_parameters", None) or {})
    prefix = f"{header.architecture}.rope.scaling."
    kind = header.scalars.get(prefix + "type")
    factor = header.scalars.get(prefix + "factor")
    orig = header.scalars.get(prefix + "original_context_length")
    if kind in ("linear", "yarn") and factor and float(factor) != 1.0:
        params.update(rope_type=kind, factor=float(factor))
        if kind == "yarn" and orig:
            params["original_max_position_embeddings"] = int(orig)
        for key in ("beta_fast", "beta_slow"):
            value = header.scalars.get(prefix + "yarn_" + key)
            if kind == "yarn" and value is not None:
                params[key] = float(value)
    elif kind not in (None, "none", "linear", "yarn"):
        raise GGUFError(f"{path}: RoPE scaling type {kind!r} is not one Nexus reads from GGUF metadata "
                        "(linear, yarn, or llama3's rope_freqs tensor)")
    if "rope_freqs.weight" in header.tensors:
        params.update(_llama3_rope(_read_plain(path, header.tensors["rope_freqs.weight"]), params, text,
                                   int(orig) if orig else 8192, path))
    if params.get("rope_type", "default") != "default":
        text.rope_parameters = params


def _llama3_rope(freqs: np.ndarray, params: dict, text, context: int, path: Path) -> dict:
    """llama3 RoPE parameters that reproduce llama.cpp's rope_freqs divisors exactly.

    llama.cpp divides each inverse frequency by rope_freqs[i]: 1 above the high-frequency cut, `factor`
    below the low one, and in between 1 / ((1 - s) / factor + s) with s linear in the frequency. The
    divisors fix `factor` and that line (s = 0 and s = 1 give low/high_freq_factor for the context)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    f = freqs.astype(np.float64)
    factor = float(f.max())
    if factor <= 1.0 + 1e-6:
        return {}
    base = float(params.get("rope_theta", 10000.0))
    dim = 2 * len(f)
    x = context * base ** (-np.arange(0, dim, 2) / dim) / (2 * math.pi)  # context / wavelength
    s = (1 / f - 1 / factor) / (1 - 1 / factor)  # 0 where divided by factor, 1 where untouched
    mid = (s > 1e-6) & (s < 1 - 1e-6)
    if mid.sum() >= 2:  # s = (x - low) / (high - low) on the smoothed frequencies
        slope, icept = np.polyfit(x[mid], s[mid], 1)
        low, high = -icept / slope, (1 - icept) / slope
    else:  # no smoothed frequency to fit: put the cuts between the untouched and the divided ones
        low = float(x[s <= 1e-6].max(initial=0.0)) * 1.0001 + 1e-9
        high = max(float(x[s >= 1 - 1e-6].min(initial=low * 2)) * 0.9999, low * 1.0001)
    out = {"rope_type": "llama3", "rope_theta": base, "factor": factor, "low_freq_factor": float(low),
           "high_freq_factor": float(high), "original_max_position_embeddings": context}
    probe = copy.deepcopy(text)
    probe.rope_parameters = out
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](probe, "cpu")
    want = torch.tensor(base ** (-np.arange(0, dim, 2) / dim) / f, dtype=torch.float32)
    if inv.shape != want.shape or not torch.allclose(inv, want, rtol=1e-4, atol=0):
        raise GGUFError(f"{path}: rope_freqs.weight does not follow llama3 RoPE scaling; Nexus cannot "
                        "reproduce these rotary frequencies")
    return out


def _read_plain(path: Path, t: GGUFTensor) -> np.ndarray:
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        return _dequantize(mm, t).copy()
    finally:
        del mm


# --- tensors ---------------------------------------------------------------------------------------


def _dequantize(mm: np.ndarray, t: GGUFTensor) -> np.ndarray:
    """One tensor's data from the mapped file as float32 in torch order (a copy, never a view of the map)."""
    from gguf import GGMLQuantizationType, dequantize
    from gguf.quants import quant_shape_to_byte_shape

    raw = mm[t.offset:t.offset + t.nbytes]
    q = GGMLQuantizationType(t.qtype)
    if t.qtype in _PLAIN:
        return raw.view(_PLAIN[t.qtype]).reshape(t.shape).astype(np.float32)  # astype copies
    return dequantize(raw.reshape(quant_shape_to_byte_shape(t.shape, q)), q).reshape(t.shape)


def _names(config, header: Header):
    """(HF parameter name -> its GGUF tensors, gguf -> HF map, the tensor processor, HF skeleton shapes).

    transformers' map (get_gguf_hf_weights_map) rebuilds gguf's name table for every submodule, which
    takes seconds per hundred layers; it is run on a one-layer skeleton and its `blk.0.` entries are
    repeated for every layer (llama.cpp numbers blocks `blk.N.` for every architecture)."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    text = config.get_text_config()
    processor = TENSOR_PROCESSORS.get(header.architecture, TensorProcessor)(config=text.to_dict())
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
        one = AutoModelForCausalLM.from_config(_one_layer(config))
    template = get_gguf_hf_weights_map(one, processor, num_layers=1)
    to_hf: dict[str, str] = {}
    for g in header.tensors:  # merged MoE maps name the tensor without its ".weight" suffix
        for key in (g, g.removesuffix(".weight")):
            m = _BLOCK.match(key)
            hf = template.get(f"blk.0.{m[2]}") if m else template.get(key)
            if hf is not None:
                to_hf[key] = hf.replace(".0.", f".{m[1]}.", 1) if m else hf
                break
    sources: dict[str, list[str]] = {}
    for g in header.tensors:
        hf = to_hf.get(g) or to_hf.get(g.removesuffix(".weight"))
        if hf is not None:
            sources.setdefault(hf, []).append(g)
    shapes = {n: tuple(p.shape) for n, p in skeleton.state_dict(keep_vars=True).items()}
    return sources, to_hf, processor, shapes


_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def _one_layer(config):
    small = copy.deepcopy(config)
    text = small.get_text_config()
    text.num_hidden_layers = 1
    if isinstance(getattr(text, "layer_types", None), list) and text.layer_types:
        text.layer_types = text.layer_types[:1]
    return small


class GGUFStore:
    """A GGUF file's tensors under the HF model's parameter names, dequantised to float32 one at a time."""

    def __init__(self, file, config=None):
        self.path = Path(file)
        self.header = read_header(self.path)
        config = config if config is not None else load_config(self.path)
        self._sources, self._to_hf, self._processor, skeleton = _names(config, self.header)
        self.meta = WeightsMeta(files=[self.path.name])
        for name, srcs in self._sources.items():
            ts = [self.header.tensors[g] for g in srcs]
            shape = ts[0].shape
            want = skeleton.get(name, shape)
            if len(ts) > 1 or (shape != want and math.prod(shape) == math.prod(want)):
                shape = want  # merged or reshaped by the processor; a real size mismatch keeps the stored shape
            dtype = _type_name(ts[0].qtype)
            self.meta.tensors[name] = TensorInfo(dtype, shape, self.path.name, stored_bytes=sum(t.nbytes for t in ts))
        self.bytes_read = 0

    @contextmanager
    def reading(self) -> Iterator[Callable[[str], torch.Tensor]]:
        mm = np.memmap(self.path, dtype=np.uint8, mode="r")  # unmapped when the block ends: pages read go too
        try:
            yield functools.partial(self._read, mm)
        finally:
            del mm

    def _read(self, mm: np.ndarray, name: str) -> torch.Tensor:
        scratch: dict = {"tensors": {}}  # processors that merge several GGUF tensors (MoE experts) write here
        out = None
        for g in self._sources[name]:
            t = self.header.tensors[g]
            w = _dequantize(mm, t)
            self.bytes_read += t.nbytes
            res = self._processor.process(weights=w, name=g, tensor_key_mapping=self._to_hf,
                                          parsed_parameters=scratch)
            out = res.weights if res.name is not None else out
        merged = scratch["tensors"].get(name)
        tensor = merged if merged is not None else torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
        return tensor.reshape(self.meta.tensors[name].shape)


def _type_name(qtype: int) -> str:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(qtype).name


# --- a whole model -------------------------------------------------------------------------------


def load_model(file, dtype: torch.dtype, config=None):
    """The whole model, built without weights and filled tensor by tensor from the file (no float32 copy of
    the entire checkpoint on the side, unlike from_pretrained's GGUF path)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from nexus_core.teachers.sli_arch import keep_fp32

    config = config if config is not None else load_config(file)
    store = GGUFStore(file, config)
    with init_empty_weights():  # parameters on meta; rotary buffers real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = dict(model.named_parameters())
    if getattr(config.get_text_config(), "tie_word_embeddings", False):  # no output.weight: tie_weights() sets it
        head = next(n for n, p in params.items() if p is model.get_output_embeddings().weight)
        if head not in store.meta.tensors:
            del params[head]
    missing = sorted(set(params) - set(store.meta.tensors))
    if missing:
        raise GGUFError(f"{file}: the file has no tensor for {len(missing)} parameter(s) of the "
                        f"{type(model).__name__} its metadata describes ({', '.join(missing[:6])}); "
                        "the file is incomplete or its architecture is converted differently")
    with store.reading() as read:
        for name, p in params.items():
            t = read(name)
            if tuple(t.shape) != tuple(p.shape):
                raise GGUFError(f"{file}: {name} is {list(t.shape)} in the file but {list(p.shape)} in the model "
                                "its metadata describes; the file is inconsistent")
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            want = torch.float32 if keep_fp32(model, name) else dtype
            owner._parameters[attr] = torch.nn.Parameter(t.to(want), requires_grad=False)
    model.tie_weights()  # the head points at the new embedding, not the meta one
    left = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    if left:
        raise GGUFError(f"{file}: parameters left without weights after loading: {', '.join(left[:6])}")
    return model.eval()
