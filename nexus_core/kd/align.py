"""Cross-tokenizer alignment: position alignment, the shared-token table and teacher weights.

Teachers from different families tokenize the same text differently, so their shards cover
the text with other rows, other positions and other ids. Everything here works from stored
shards and tokenizer files alone (no teacher forward), so a teacher with another vocabulary
can still teach a student while it trains on one small GPU. Positions are compared in the
text coordinate of data.pack_with_offsets (character spans of every token).
"""

from __future__ import annotations

import json
import math

import torch

from nexus_core.data import METASPACE

# --- position alignment --------------------------------------------------------------------

SPAN_WIDTH_CAP = 4096  # token widths at or above this share one key in exact-span mode (never in practice)


def next_token_starts(cs: torch.Tensor, ce: torch.Tensor, mask: torch.Tensor, cross_rows: bool,
                      exact_span: bool = False) -> torch.Tensor:
    """For every position p the character where the next text token it predicts starts, or -1.

    cs/ce/mask (n, T) -> (n, T) int64. A special prefix token (a real position with span -1, e.g. the
    <bos> that leads each row) stands for no text: it is never a next token, so the token p predicts is
    the next position that covers text (the prefix position itself predicts its row's first text
    token). -1 where p is padding or no such token follows, where the next token is zero-width, or
    where it is a continuation (starts inside the current token's span: the 2nd byte-token of a split
    character) - its start is not a boundary both tokenizations share.
    Rows are one contiguous stream, so the last position of a row predicts the next row's first text
    token when cross_rows (False when extraction skipped rows: the stream has gaps).
    exact_span: the key also encodes the next token's width (start * SPAN_WIDTH_CAP + width), so
    positions align only where both tokenizers predict a token with exactly the same text.
    """
    n, T = cs.shape
    fs, fe, fm = cs.reshape(-1), ce.reshape(-1), mask.reshape(-1).bool()
    N = fs.numel()
    nxt = _next_text_position(fs, fm)  # (N,) flat index of the next position that covers text, N if none
    has = nxt < N
    j = nxt.clamp(max=N - 1)
    key = fs[j] * SPAN_WIDTH_CAP + (fe[j] - fs[j]).clamp(max=SPAN_WIDTH_CAP - 1) if exact_span else fs[j]
    ok = fm & has & fm[j] & (fe[j] > fs[j]) & (fs[j] >= fe)
    if not cross_rows:
        ok &= torch.div(j, T, rounding_mode="floor") == torch.div(torch.arange(N), T, rounding_mode="floor")
    return torch.where(ok, key, torch.full_like(key, -1)).view(n, T)


def _next_text_position(fs: torch.Tensor, fm: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N,): for each flat position the first later one that is not a special prefix token
    (padding counts: it ends the stream), or N."""
    N = fs.numel()
    idx = torch.arange(N)
    candidate = torch.where(fm & (fs < 0), torch.full_like(idx, N), idx)  # prefix tokens are skipped
    after = torch.full_like(idx, N)
    after[:-1] = candidate[1:]
    return after.flip(0).cummin(0).values.flip(0)  # suffix minimum: the nearest candidate after p


def align_positions(student_next: torch.Tensor, teacher_next: torch.Tensor) -> torch.Tensor:
    """Map student positions onto teacher positions that predict a token starting at the same character.

    student_next (n_s, T), teacher_next (n_t, T): next_token_starts() of each.
    Returns (n_s, T) int64: the teacher's flat position (row * T + t) or -1 (no KD there).
    Only exact starts align: a teacher token that merely covers the character starts earlier,
    so its distribution is about other text. Among teacher positions with equal starts the
    first wins (next_token_starts already dropped continuations).
    """
    tn = teacher_next.reshape(-1)
    valid = (tn >= 0).nonzero().squeeze(-1)  # flat teacher positions with a usable key
    keys = tn[valid]
    order = torch.sort(keys, stable=True).indices
    keys, pos = keys[order], valid[order]
    q = student_next.reshape(-1)
    i = torch.searchsorted(keys, q.clamp(min=0)).clamp(max=max(len(keys) - 1, 0))
    if len(keys) == 0:
        return torch.full_like(student_next, -1)
    hit = (q >= 0) & (keys[i] == q)
    return torch.where(hit, pos[i], torch.full_like(q, -1)).view(student_next.shape)


# --- shared-token table ----------------------------------------------------------------------

def _bytes_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in char -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _is_byte_level(tokenizer) -> bool:
    try:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
    except Exception:
        return False
    return "ByteLevel" in json.dumps(spec.get("decoder") or {}) or "ByteLevel" in json.dumps(spec.get("pre_tokenizer") or {})


def token_keys(tokenizer) -> list:
    """A vocabulary-independent key per id: the bytes of text the token stands for.

    Byte-level BPE writes a space as 'Ġ' (GPT-2's byte alphabet), SentencePiece/Metaspace as
    '▁', byte fallback as '<0x41>'; all become the same raw bytes here, so ' the' in one
    vocabulary meets ' the' in the other. Special tokens key on their role (eos, bos, pad, unk),
    because families spell them differently ('</s>', '<|endoftext|>', ...). None: no key.
    """
    V = len(tokenizer)
    keys: list = [None] * V
    roles = {}
    for role in ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id"):
        tid = getattr(tokenizer, role, None)
        if tid is not None and tid not in roles:
            roles[tid] = ("special", role)
    byte_level = _is_byte_level(tokenizer)
    dec = _bytes_decoder() if byte_level else {}
    special = set(tokenizer.all_special_ids)
    for tid, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(V)))):
        if tid in roles:
            keys[tid] = roles[tid]
        elif tok is None or tid in special:
            keys[tid] = ("added", tok)
        elif byte_level and all(ch in dec for ch in tok):
            keys[tid] = bytes(dec[ch] for ch in tok)
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            keys[tid] = bytes([int(tok[3:5], 16)])
        else:
            keys[tid] = tok.replace(METASPACE, " ").encode("utf-8")
    return keys


def vocab_map(teacher_tok, student_tok) -> tuple[torch.Tensor, dict]:
    """teacher id -> student id with the same text (or -1): (V_t,) int64, and coverage figures.

    One-to-one: when two teacher ids would land on one student id the first keeps it (the
    second's mass goes to the vocabulary-free term), so mapped mass is never counted twice.
    """
    s_index: dict = {}
    for sid, key in enumerate(token_keys(student_tok)):
        if key is not None:
            s_index.setdefault(key, sid)
    table = torch.full((len(teacher_tok),), -1, dtype=torch.int64)
    taken: set[int] = set()
    for tid, key in enumerate(token_keys(teacher_tok)):
        sid = s_index.get(key)
        if sid is not None and sid not in taken:
            table[tid] = sid
            taken.add(sid)
    shared = int((table >= 0).sum())
    return table, {"teacher_vocab": len(teacher_tok), "student_vocab": len(student_tok), "shared_tokens": shared,
                   "shared_vocab_pct": round(100.0 * shared / max(len(teacher_tok), 1), 2)}


# --- per-domain teacher weights ------------------------------------------------------------------

def quality_weights(losses: dict[str, float | None], registry: dict[str, float], tau: float) -> dict[str, float]:
    """Per-domain teacher weights: softmax(-loss / tau) over the teachers x registry weight.

    `losses` are held-out losses on the domain in nats per character (comparable across
    tokenizers); when any is unknown every teacher gets its registry weight alone (equal
    quality). Weights are then scaled to sum to the registry weights' sum, so one teacher
    keeps its registry weight and the loss scale does not depend on how many teachers there are.
    """
    ids = sorted(registry)
    if not ids:
        return {}
    known = [losses.get(t) for t in ids]
    if any(v is None or not math.isfinite(v) for v in known) or tau <= 0:
        q = {t: 1.0 for t in ids}
    else:
        lo = min(known)
        ex = {t: math.exp(-(v - lo) / tau) for t, v in zip(ids, known)}
        z = sum(ex.values())
        q = {t: len(ids) * e / z for t, e in ex.items()}
    raw = {t: q[t] * registry[t] for t in ids}
    scale = sum(registry.values()) / max(sum(raw.values()), 1e-30)
    return {t: raw[t] * scale for t in ids}
