"""How a teacher runs: loaded whole or streamed layer by layer (SLI), decided once, here.

`choose_mode` weighs --sli, the parameter count and the estimated footprint against the memory
budget and says why in words; `open_runner` opens the runner for the mode the profile chose."""

from __future__ import annotations

import torch

from nexus_core.config import Settings, parse_bytes
from nexus_core.records.registry import Teacher
from nexus_core.teachers.loading import TeacherLoadError
from nexus_core.teachers.logits import logit_positions
from nexus_core.teachers.runner import FullRunner, TeacherRunner


def open_runner(teacher: Teacher, mode: str, device: str, dtype: torch.dtype | None = None,
                memory_budget_bytes: int | None = None) -> TeacherRunner:
    """A runner for `teacher`: FullRunner for mode 'full', sli.StreamingRunner for 'sli'."""
    if mode == "sli":
        from nexus_core.teachers import sli

        return sli.StreamingRunner(teacher.path, device=device, dtype=dtype,
                                   trust_remote_code=teacher.trust_remote_code,
                                   memory_budget_bytes=memory_budget_bytes)
    if mode != "full":
        raise ValueError(f"unknown teacher mode {mode!r}")
    return FullRunner(teacher.path, device=device, dtype=dtype,
                      trust_remote_code=teacher.trust_remote_code, teacher_id=teacher.teacher_id)


def choose_mode(cfg: Settings, teacher: Teacher, config, meta, device: str, dtype: torch.dtype):
    """(mode, reason in words, sli_supported, why not, sizes) from --sli, the size and the memory budget."""
    want = teacher.sli or cfg.run.sli
    sli_ok, sli_how = _sli_support(config)
    sli_why = None if sli_ok else sli_how
    sizes = _footprint(cfg, config.get_text_config(), meta, device, dtype)
    need, budget, source = sizes["footprint_bytes"], sizes["budget_bytes"], sizes["budget_source"]
    fits = need <= budget
    fit_words = f"estimated footprint {_gb(need)} {'fits' if fits else 'exceeds'} the memory budget {_gb(budget)} ({source})"
    threshold = cfg.memory.sli_params_threshold
    if want == "never":
        return "full", f"--sli never; {fit_words}", sli_ok, sli_why, sizes
    if want == "always":
        why = "--sli always"
    elif meta.params > threshold:
        why = f"{meta.params / 1e9:.2f}B parameters > sli_params_threshold {threshold / 1e9:g}B"
    elif not fits:
        why = fit_words
    else:
        return "full", f"--sli auto: {fit_words}", sli_ok, sli_why, sizes
    if sli_ok:  # the reason names what streams and how (architecture, weight format)
        return "sli", f"{why}; {sli_how}", sli_ok, sli_why, sizes
    if want == "always":  # asked for by name: never a silent full load
        raise TeacherLoadError(f"teacher {teacher.teacher_id!r}: --sli always, but SLI cannot stream it: use --sli "
                               f"auto or never to load it whole ({fit_words}). Why: {sli_why}")
    if fits:
        return "full", f"{why}, but SLI cannot stream this model ({sli_why}); {fit_words}, so it is loaded whole", \
            sli_ok, sli_why, sizes
    raise TeacherLoadError(f"teacher {teacher.teacher_id!r}: {why}, and SLI cannot stream it ({sli_why}); "
                     f"{fit_words}. Raise --memory-budget, use a machine with more memory, or pick another teacher")


def _sli_support(config) -> tuple[bool, str]:
    """(whether SLI streams this model, how it does, or why it cannot)."""
    try:
        from nexus_core.teachers import sli
    except ImportError as exc:
        return False, f"SLI is unavailable ({exc})"
    ok, why = sli.sli_support(config)
    return bool(ok), why


def _footprint(cfg: Settings, tcfg, meta, device: str, dtype: torch.dtype) -> dict:
    """Weights at the load dtype + one batch of activations + one logits chunk + a margin, vs the budget."""
    elem = _ELEM_BYTES.get(dtype, 4)
    weights = meta.params * elem
    B, T = cfg.extract.batch_size, cfg.extract.seq_len
    H = int(tcfg.hidden_size)
    inter = int(getattr(tcfg, "intermediate_size", None) or 4 * H)
    vocab = int(tcfg.vocab_size)
    acts = B * T * (8 * H + 3 * inter) * elem + min(B * T, logit_positions(cfg.extract, vocab)) * vocab * 4 * 3
    need = weights + acts + int(0.1 * weights) + (64 << 20)
    if cfg.memory.budget:
        budget, source = parse_bytes(cfg.memory.budget), "--memory-budget"
    elif str(device).startswith("cuda"):
        budget, source = int(torch.cuda.mem_get_info()[0]), "free CUDA memory"
    else:
        import psutil

        budget, source = int(psutil.virtual_memory().available), "available RAM"
    return {"footprint_bytes": int(need), "budget_bytes": int(budget), "budget_source": source}


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


_ELEM_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
