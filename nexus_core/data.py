"""Local datasets: discovery, loading with Hugging Face `datasets`, hash split, packing.

`datasets/<category>/<name>/` holds jsonl, json, parquet, csv, txt files or a
`save_to_disk` folder. A fixed hash split keeps a held-out share out of extraction and
training forever: the same document always lands on the same side.

Text coordinate (fixed, shared by every tokenizer): a dataset's training split (the
documents of load_texts in their order, less the held-out ones of split) is read as
one string in which every document is followed by ONE separator character. Document i starts
at sum_{j<i} (len(doc_j) + 1). A token's span [char_start, char_end) is in that coordinate:
a document token carries its tokenizer offset mapping shifted by the document's start; the
EOS token that pack appends after each document covers exactly the separator character,
so EOS tokens of different tokenizers align too. Padding has span (-1, -1). Zero-width tokens
(a Metaspace "\u2581" prepended at a document start, which maps onto the first letter) get
char_end == char_start.

Special prefix: every packed row starts the way the tokenizer's own post-processor starts an
encoded text (special_prefix: [<bos>] for Gemma or Llama 3, nothing for SmolLM2 or GPT-2), because
that is what the model saw in training; a model that expects <bos> at position 0 scores far worse
without it. The prefix is added once per row, never inside the text stream, so there is no double
BOS. Prefix tokens stand for no text: they are real positions (mask 1) with span (-1, -1). The
post-processor's suffix (an EOS some tokenizers append) is not used: documents are already joined
by one EOS each, and that EOS covers the separator character of the text coordinate.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from nexus_core.errors import DatasetError, UnsafePathError
from nexus_core.paths import DATASET_PART_RE, Paths

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
PAD_SPAN = -1  # char_start/char_end of padding
NO_TEXT_SPAN = -1  # char_start/char_end of a special prefix token (a real position that covers no text)
_PROBE = "Hello world"  # any ordinary text: the post-processor's additions around it are its special prefix
METASPACE = "\u2581"
_PAIRS = (("prompt", "response"), ("question", "answer"), ("instruction", "output"))


@dataclass(frozen=True, order=True)
class DatasetRef:
    category: str
    name: str

    @classmethod
    def parse(cls, text: str) -> "DatasetRef":
        parts = text.strip().split("/")
        if len(parts) != 2 or not all(DATASET_PART_RE.fullmatch(p) for p in parts):
            raise DatasetError(f"dataset {text!r}: use category/name, e.g. reasoning/arithmetic")
        return cls(*parts)

    @property
    def key(self) -> str:
        return f"{self.category}/{self.name}"

    @property
    def slug(self) -> str:
        """Folder name under memory/<teacher>/."""
        return f"{self.category}__{self.name}"

    def __str__(self) -> str:
        return self.key


def discover(paths: Paths) -> list[DatasetRef]:
    """Every datasets/<category>/<name>/ folder that holds something."""
    refs = []
    if paths.datasets.exists():
        for cat in sorted(paths.datasets.iterdir()):
            if not cat.is_dir() or not DATASET_PART_RE.fullmatch(cat.name):
                continue
            for ds in sorted(cat.iterdir()):
                if ds.is_dir() and DATASET_PART_RE.fullmatch(ds.name) and any(ds.iterdir()):
                    refs.append(DatasetRef(cat.name, ds.name))
    return refs


def select(paths: Paths, spec: str) -> list[DatasetRef]:
    """`all` or `c/n,c/n` -> refs; a named dataset that is missing is an error naming its folder."""
    if not spec or spec.strip() == "all":
        return discover(paths)
    refs = sorted({DatasetRef.parse(s) for s in spec.split(",") if s.strip()})
    for ref in refs:
        folder = dataset_folder(paths, ref)
        if not folder.is_dir():
            raise DatasetError(f"dataset {ref}: folder {folder} does not exist; create it or drop it from --datasets")
    return refs


def dataset_folder(paths: Paths, ref: DatasetRef) -> Path:
    try:
        return paths.dataset_dir(ref.category, ref.name)
    except UnsafePathError as exc:
        raise DatasetError(str(exc)) from None


def _row_text(row: dict, text_field: str) -> str | None:
    if text_field:
        v = row.get(text_field)
        return v if isinstance(v, str) else None
    v = row.get("text")
    if isinstance(v, str):
        return v
    for a, b in _PAIRS:
        if isinstance(row.get(a), str) and isinstance(row.get(b), str):
            return f"{row[a]}\n{row[b]}"
    v = row.get("content")
    return v if isinstance(v, str) else None


def load_texts(paths: Paths, ref: DatasetRef, text_field: str = "") -> list[str]:
    """All documents of a dataset, in a fixed order (sorted files, then rows)."""
    import datasets as hf_datasets

    folder = dataset_folder(paths, ref)
    if not folder.is_dir():
        raise DatasetError(f"dataset {ref}: folder {folder} does not exist")
    hf_datasets.disable_progress_bars()
    cache_dir = str(paths.state_dir / "hf-datasets-cache")
    try:
        if (folder / "dataset_info.json").exists() or (folder / "state.json").exists():
            ds = hf_datasets.load_from_disk(str(folder))
            if isinstance(ds, hf_datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
            parts = [ds]
        else:
            files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _BUILDERS)
            if not files:
                raise DatasetError(f"dataset {ref}: {folder} holds no jsonl/json/parquet/csv/txt files or save_to_disk folder")
            parts = []
            for builder in sorted({_BUILDERS[p.suffix.lower()] for p in files}):
                group = [str(p) for p in files if _BUILDERS[p.suffix.lower()] == builder]
                kwargs = {"sample_by": "document"} if builder == "text" else {}
                parts.append(hf_datasets.load_dataset(builder, data_files=group, split="train",
                                                      cache_dir=cache_dir, **kwargs))
    except DatasetError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable files
        raise DatasetError(f"dataset {ref}: cannot read {folder} ({type(exc).__name__}: {str(exc)[:200]})") from None
    texts: list[str] = []
    columns: set[str] = set()
    for ds in parts:
        columns.update(ds.column_names)
        for row in ds:
            t = _row_text(row, text_field)
            if t and t.strip() and "\x00" not in t:
                texts.append(t)
    if not texts:
        want = f"column {text_field!r}" if text_field else "a 'text' column, prompt+response or question+answer"
        raise DatasetError(f"dataset {ref}: no usable text in {folder} (columns: {sorted(columns)}); it needs {want}")
    return texts


def is_heldout(text: str, fraction: float) -> bool:
    """Fixed hash split: a document's side depends on its content alone."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < fraction


def split(texts: list[str], fraction: float) -> tuple[list[str], list[str]]:
    train, heldout = [], []
    for t in texts:
        (heldout if is_heldout(t, fraction) else train).append(t)
    return train, heldout


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer's own post-processor puts before a text: [bos] for Gemma/Llama 3, [] for
    SmolLM2/GPT-2 (found by encoding a probe text with and without special tokens)."""
    bare = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(_PROBE, add_special_tokens=True)["input_ids"])
    for k in range(len(full) - len(bare) + 1):
        if full[k:k + len(bare)] == bare:
            return full[:k]
    return []  # the post-processor rewrites the text's own ids: no prefix we could add by hand


def _pad_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)


def _body_len(seq_len: int, prefix: list[int]) -> int:
    """Stream tokens per row: seq_len less the special prefix every row starts with."""
    body = seq_len - len(prefix)
    if body < 1:
        raise DatasetError(f"seq_len {seq_len} leaves no room after the tokenizer's {len(prefix)} special "
                           f"prefix token(s); raise --extract-seq-len")
    return body


def _rows(stream: list[int], head: list[int], seq_len: int, fill: int, dtype):
    """The stream cut into rows of seq_len - len(head) tokens, each row led by `head`: (n, T) of dtype."""
    import torch

    body = _body_len(seq_len, head)
    n = (len(stream) + body - 1) // body
    if n == 0:
        raise DatasetError("dataset produced no tokens after tokenisation")
    rows = torch.full((n, seq_len), fill, dtype=dtype)
    flat = torch.full((n * body,), fill, dtype=dtype)
    flat[: len(stream)] = torch.tensor(stream, dtype=dtype)
    rows[:, len(head):] = flat.view(n, body)
    if head:
        rows[:, : len(head)] = torch.tensor(head, dtype=dtype)
    return rows


def _mask(n_stream: int, n_head: int, seq_len: int):
    """attention_mask uint8 (n, T) of _rows: the head and every stream token are real, the tail padding."""
    import torch

    return _rows([1] * n_stream, [1] * n_head, seq_len, 0, torch.uint8)


def pack(tokenizer, texts: list[str], seq_len: int, max_sequences: int = 0):
    """Tokenise documents, join them with EOS and cut the stream into seq_len rows, each led by the
    tokenizer's special prefix (module docstring).

    Returns (input_ids int32 [n, T], attention_mask uint8 [n, T]); the last row is padded
    (mask 0) with the pad id (or EOS when the tokenizer has no pad token).
    """
    import torch

    eos, prefix = tokenizer.eos_token_id, special_prefix(tokenizer)
    stream: list[int] = []
    limit = max_sequences * _body_len(seq_len, prefix) if max_sequences > 0 else None
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
        if limit is not None and len(stream) >= limit:
            break
    if limit is not None:
        stream = stream[:limit]
    ids = _rows(stream, prefix, seq_len, _pad_id(tokenizer), torch.int32)
    return ids, _mask(len(stream), len(prefix), seq_len)


def text_fingerprint(texts: list[str]) -> str:
    """sha256 (16 hex) of the text coordinate: documents each followed by one separator."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x1e")
    return h.hexdigest()[:16]


def _doc_offsets(tokenizer, text: str, base: int) -> tuple[list[int], list[int], list[int]]:
    """Ids and [start, end) spans (shifted by base) of one document, as data.pack tokenises it."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    starts, ends = [], []
    for tid, (a, b) in zip(ids, enc["offset_mapping"]):
        if tokenizer.convert_ids_to_tokens(tid) == METASPACE and text[a:b] != " ":
            b = a  # a prepended word-boundary marker, not text: zero width
        starts.append(base + a)
        ends.append(base + b)
    return ids, starts, ends


def pack_with_offsets(tokenizer, texts: list[str], seq_len: int, max_sequences: int = 0):
    """data.pack plus each token's character span in the text coordinate.

    Returns (input_ids int32 [n, T], attention_mask uint8 [n, T], char_start int64 [n, T],
    char_end int64 [n, T]); ids and mask are exactly data.pack's, the special prefix's spans are
    NO_TEXT_SPAN. Needs a fast tokenizer (offset mapping); a slow one raises NotImplementedError.
    """
    import torch

    if not getattr(tokenizer, "is_fast", False):
        raise NotImplementedError("character offsets need a fast (Rust) tokenizer")
    eos, prefix = tokenizer.eos_token_id, special_prefix(tokenizer)
    ids_s: list[int] = []
    cs_s: list[int] = []
    ce_s: list[int] = []
    limit = max_sequences * _body_len(seq_len, prefix) if max_sequences > 0 else None
    base = 0
    for text in texts:
        ids, starts, ends = _doc_offsets(tokenizer, text, base)
        ids_s += ids
        cs_s += starts
        ce_s += ends
        sep = base + len(text)
        if eos is not None:
            ids_s.append(eos)
            cs_s.append(sep)
            ce_s.append(sep + 1)
        base = sep + 1
        if limit is not None and len(ids_s) >= limit:
            break
    if limit is not None:
        ids_s, cs_s, ce_s = ids_s[:limit], cs_s[:limit], ce_s[:limit]
    no_text = [NO_TEXT_SPAN] * len(prefix)
    ids = _rows(ids_s, prefix, seq_len, _pad_id(tokenizer), torch.int32)
    cs = _rows(cs_s, no_text, seq_len, PAD_SPAN, torch.int64)
    ce = _rows(ce_s, no_text, seq_len, PAD_SPAN, torch.int64)
    return ids, _mask(len(ids_s), len(prefix), seq_len), cs, ce
