"""Router: map a prompt to its domain (dataset) and to the teacher best suited to it.

Design: the released student is a frozen feature extractor; a prompt's feature is the
mean over its tokens of every layer's hidden state (embeddings included), standardised,
and a linear softmax head is trained on prompts cut from each dataset's train split.
Held-out accuracy is measured on prompts from the held-out split, which neither
extraction nor distillation saw. The teacher per label is the one distill weighed highest on
that dataset: with equal registry weights, the lowest held-out loss per character, the scale on
which teachers with different tokenizers compare (kd/domain_quality.py); router.json says why.
"""

from __future__ import annotations

import json
import random

import structlog
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from nexus_core import data
from nexus_core.config import Settings
from nexus_core.context import StageContext, StageResult
from nexus_core.errors import CorruptArtifactError
from nexus_core.kd.domain_quality import best_teachers, domain_quality
from nexus_core.paths import Paths
from nexus_core.records.plan import DistillPlan
from nexus_core.storage.atomic import atomic_path, write_json

log = structlog.get_logger("nexus.router")
MAX_TOKENS, MIN_TOKENS = 64, 6
_cache: dict = {}


def _prompts(tokenizer, texts: list[str], n: int, rng: random.Random) -> list[list[int]]:
    """Up to n prompts: packed windows of the documents, cut to a random length (prompts vary)."""
    if not texts or n <= 0:
        return []
    ids, mask = data.pack(tokenizer, texts, MAX_TOKENS, n)
    out = []
    for row, m in zip(ids.tolist(), mask.tolist()):
        real = row[: sum(m)]
        if len(real) >= MIN_TOKENS:
            out.append(real[: rng.randint(MIN_TOKENS, len(real))])
    return out


def prompt_ids(tokenizer, text: str, max_tokens: int) -> list[int]:
    """A prompt's ids as the router was trained on them (data.pack's rows): the tokenizer's special
    prefix (<bos> where it adds one), then the text, cut to max_tokens; never empty."""
    prefix = data.special_prefix(tokenizer)
    ids = prefix + tokenizer(text, add_special_tokens=False)["input_ids"][: max(max_tokens - len(prefix), 0)]
    return ids or [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0]


@torch.no_grad()
def features(model, prompts: list[list[int]], pad_id: int, device: str, batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled hidden states of every layer, concatenated: -> (n, (L+1) * H) float32."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([p + [pad_id] * (width - len(p)) for p in chunk], device=device)  # (b, W)
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in chunk], device=device)
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states  # L+1 x (b, W, H)
        m = mask.unsqueeze(-1).float()
        out.append(torch.cat([(h.float() * m).sum(1) / m.sum(1) for h in hs], dim=-1).cpu())
    return torch.cat(out)


def _best_teachers(cfg: Settings, paths: Paths, plan: DistillPlan) -> dict[str, dict]:
    """Per label the teacher distill trusted most on it, by held-out nats per character (every teacher,
    whatever its tokenizer): {label: {"teacher", "reason", "scores": {teacher: {loss_per_char, weight}}}}."""
    quality = domain_quality(cfg, plan, paths)
    ev_path = paths.results / "eval.json"
    ev = json.loads(ev_path.read_text()).get("datasets", {}) if ev_path.exists() else {}
    token_losses = {d: {t: m["loss"] for t, m in ev.get(d, {}).get("teachers", {}).items()} for d in plan.datasets}
    chosen = best_teachers(quality, plan.primary, token_losses)
    return {d: {**c, "scores": quality[d]} for d, c in chosen.items()}


def _load_student(paths: Paths, device: str):
    from transformers import AutoModelForCausalLM

    from nexus_core.teachers.loading import tokenizer_from

    if not (paths.release / "config.json").exists():
        raise CorruptArtifactError(f"{paths.release}: no released student; run the distill stage first")
    model = AutoModelForCausalLM.from_pretrained(paths.release, dtype=torch.float32).to(device).eval()
    tok = tokenizer_from(paths.release)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return model, tok, pad


def run_router(cfg: Settings, plan: DistillPlan, paths: Paths, ctx: StageContext = StageContext()) -> StageResult:
    device = cfg.resolved_device()
    ctx.started()
    model, tok, pad = _load_student(paths, device)
    rng = random.Random(cfg.run.seed)
    labels = list(plan.datasets)
    # 1. Prompts from each dataset's train split (fit) and held-out split (accuracy).
    train_x, train_y, held_x, held_y, source = [], [], [], [], "heldout split"
    for y, d in enumerate(labels):
        texts = data.load_texts(paths, data.DatasetRef.parse(d), cfg.extract.text_field)
        rng.shuffle(texts)
        train, held = data.split(texts, cfg.extract.heldout_fraction)
        tr, he = _prompts(tok, train, cfg.router.max_samples, rng), _prompts(tok, held, cfg.router.max_samples // 4, rng)
        if len(he) < 5:  # too few held-out documents: hold out a fifth of the train prompts instead
            cut = max(1, len(tr) // 5)
            tr, he, source = tr[cut:], tr[:cut], "train-split prompts held back (held-out split too small)"
        train_x += tr
        train_y += [y] * len(tr)
        held_x += he
        held_y += [y] * len(he)
        ctx.progress(label=d, train=len(tr), heldout=len(he))
    # 2. Frozen features, standardised with the training statistics.
    xtr, xhe = features(model, train_x, pad, device), features(model, held_x, pad, device)
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-4)
    xtr, xhe = (xtr - mean) / std, (xhe - mean) / std
    ytr, yhe = torch.tensor(train_y), torch.tensor(held_y)
    # 3. Linear softmax head, mini-batch AdamW.
    g = torch.Generator().manual_seed(cfg.run.seed)
    head = torch.nn.Linear(xtr.shape[1], len(labels))
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.router.lr, weight_decay=0.01)
    for _ in range(cfg.router.epochs):
        for idx in torch.randperm(len(ytr), generator=g).split(32):
            loss = F.cross_entropy(head(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (head(xhe).argmax(-1) == yhe).float().mean().item()
        train_acc = (head(xtr).argmax(-1) == ytr).float().mean().item()
    # 4. Write router.safetensors + router.json.
    out = paths.router_dir
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "router.safetensors") as tmp:
        save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous(),
                   "feature_mean": mean.contiguous(), "feature_std": std.contiguous()}, str(tmp))
    choice = _best_teachers(cfg, paths, plan)
    best = {d: c["teacher"] for d, c in choice.items()}
    for d, c in choice.items():
        log.info("router.teacher_for_label", label=d, teacher=c["teacher"], reason=c["reason"])
    spec = {"labels": labels, "teacher_per_label": best, "teacher_choice": choice, "heldout_accuracy": round(acc, 4),
            "train_accuracy": round(train_acc, 4), "heldout_source": source,
            "samples": {"train": len(ytr), "heldout": len(yhe)}, "plan_fp": plan.fingerprint(),
            "feature": {"model": "nexus-release-v1", "pooling": "mean over real tokens",
                        "layers": "all hidden states (embeddings + every decoder layer), concatenated",
                        "dim": int(xtr.shape[1]), "max_tokens": MAX_TOKENS, "standardised": True},
            "head": "linear softmax"}
    write_json(out / "router.json", spec)
    log.info("router.trained", labels=labels, heldout_accuracy=round(acc, 4), samples=len(ytr))
    _cache.clear()
    return StageResult(artifacts=[out / "router.safetensors", out / "router.json"],
                       data={"heldout_accuracy": acc, "labels": labels, "teacher_per_label": best})


def route(paths: Paths, text: str) -> dict:
    """{"label", "teacher", "probabilities": {label: p}} for one prompt."""
    spec_path, w_path = paths.router_dir / "router.json", paths.router_dir / "router.safetensors"
    if not spec_path.exists() or not w_path.exists():
        raise CorruptArtifactError(f"{paths.router_dir}: no trained router; run the router stage first")
    key = (str(paths.home), spec_path.stat().st_mtime_ns, (paths.release / "model.safetensors").stat().st_mtime_ns)
    if _cache.get("key") != key:
        model, tok, pad = _load_student(paths, "cpu")
        _cache.update(key=key, model=model, tok=tok, pad=pad, spec=json.loads(spec_path.read_text()),
                      w=load_file(str(w_path)))
    spec, w, tok = _cache["spec"], _cache["w"], _cache["tok"]
    ids = prompt_ids(tok, text, spec["feature"]["max_tokens"])
    x = (features(_cache["model"], [ids], _cache["pad"], "cpu") - w["feature_mean"]) / w["feature_std"]
    probs = torch.softmax(x @ w["weight"].T + w["bias"], dim=-1)[0]
    label = spec["labels"][int(probs.argmax())]
    return {"label": label, "teacher": spec["teacher_per_label"].get(label),
            "probabilities": {lab: round(float(p), 4) for lab, p in zip(spec["labels"], probs)}}
