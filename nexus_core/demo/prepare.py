"""`nexus run --demo`: generate the demo data, train two small teachers, register them.

The teachers learn from their own pool, disjoint from the datasets (demo_data.teacher_pool): like
pretrained models, they know more than the user's rows show and have never seen them.

prepare_demo() is idempotent and cached: the datasets carry a marker with their
generator's hash, the tokenizer and each teacher live under .nexus/demo-cache/ with a
marker holding the hash of everything that made them, so a second run reuses them at once.
The teachers are ordinary HF folders (safetensors) registered through registry/*.json,
exactly like a user's teachers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from nexus_core.config import Settings
from nexus_core.data import pack, split
from nexus_core.demo.demo_data import DataSpec, dataset_texts, ensure_datasets, teacher_pool
from nexus_core.demo.model_factory import build_model, make_config, save_model, train_tokenizer
from nexus_core.errors import DatasetError
from nexus_core.kd.trainer import eval_causal_lm, train_causal_lm
from nexus_core.paths import Paths
from nexus_core.storage.atomic import sha256_file, write_json

MARKER = "demo_marker.json"
CODE, ARITH = "code/python-stdlib", "reasoning/arithmetic"


@dataclass(frozen=True)
class TeacherSpec:
    name: str
    arch: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    steps: int
    lr: float
    batch_size: int
    code_share: float  # share of training rows drawn from code (the rest: arithmetic)
    seed: int
    primary: bool = False
    sli: str | None = None  # registry override; "always" sends this teacher through SLI


@dataclass(frozen=True)
class DemoSpec:
    data: DataSpec = field(default_factory=DataSpec)
    vocab_size: int = 2048
    seq_len: int = 128
    eval_rows: int = 48  # held-out rows per dataset for the loss figures
    teachers: tuple[TeacherSpec, ...] = (
        # Different strengths: the llama teacher sees mostly code, the qwen2 one mostly arithmetic.
        TeacherSpec("demo-llama", "llama", hidden=192, layers=4, heads=6, kv_heads=2, intermediate=512,
                    steps=500, lr=3e-3, batch_size=16, code_share=0.75, seed=11, primary=True),
        TeacherSpec("demo-qwen2", "qwen2", hidden=160, layers=5, heads=5, kv_heads=1, intermediate=448,
                    steps=500, lr=3e-3, batch_size=16, code_share=0.35, seed=22, sli="always"),
    )

    @classmethod
    def small(cls) -> "DemoSpec":
        """Tiny sizes for tests: seconds, not minutes."""
        t = cls().teachers
        data = DataSpec(arithmetic_rows=400, stdlib_bytes=100_000, stdlib_max_file_bytes=6000,
                        pool_arithmetic_rows=800, pool_stdlib_bytes=100_000)
        return cls(data=data, vocab_size=384, seq_len=64, eval_rows=8,
                   teachers=(replace(t[0], hidden=48, layers=2, heads=4, kv_heads=2, intermediate=96,
                                     steps=40, batch_size=8, lr=5e-3),
                             replace(t[1], hidden=48, layers=2, heads=4, kv_heads=1, intermediate=96,
                                     steps=40, batch_size=8, lr=5e-3)))


def _fp(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def format_params(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


# --- training loop (reused by the benchmarks) --------------------------------------------


# --- progress ------------------------------------------------------------------------------

class _Bar:
    """One task's progress: a rich bar when a console is given, else a structlog line every ~10%."""

    def __init__(self, progress, label: str, total: int):
        import structlog

        self._p, self._label, self._total = progress, label, total
        self._log = structlog.get_logger("nexus.demo")
        self._task = progress.add_task(label, total=total) if progress else None

    def step(self, i: int, loss: float) -> None:
        if self._p is not None:
            self._p.update(self._task, advance=1, description=f"{self._label} loss {loss:.3f}")
        elif (i + 1) % max(1, self._total // 10) == 0 or i + 1 == self._total:
            self._log.info("demo.train", teacher=self._label, step=i + 1, of=self._total, loss=round(loss, 4))


@contextmanager
def _progress(console):
    if console is None:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as p:
        yield p


def _say(console, msg: str, **kv) -> None:
    if console is not None:
        console.print(f"[bold]demo[/bold] {msg}" + "".join(f"  {k}={v}" for k, v in kv.items()))
    else:
        import structlog

        structlog.get_logger("nexus.demo").info(f"demo.{msg.split()[0]}", msg=msg, **kv)


# --- cache helpers ---------------------------------------------------------------------

def _read_marker(folder: Path, fp: str) -> dict | None:
    """The marker when the folder is complete for `fp` (files present with their sha256), else None."""
    try:
        m = json.loads((folder / MARKER).read_text())
        if m.get("fp") != fp:
            return None
        for name, digest in m["files"].items():
            if sha256_file(folder / name) != digest:
                return None
        return m
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _publish(tmp: Path, final: Path, marker: dict, hashed: tuple[str, ...]) -> None:
    """Write the marker into tmp, then swap tmp in for final (the marker vouches only for finished folders)."""
    marker = {**marker, "files": {n: sha256_file(tmp / n) for n in hashed if (tmp / n).exists()}}
    write_json(tmp / MARKER, marker)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _quiet_save(model, tok, folder: Path) -> None:
    """save_model without transformers' own "Writing model shards" bar, which would break ours."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        save_model(model, tok, folder)
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _tmp_dir(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _tokenizer(cache: Path, texts: list[str], vocab: int, fp: str):
    from transformers import PreTrainedTokenizerFast

    folder = cache / "tokenizer"
    if _read_marker(folder, fp) is not None:
        return PreTrainedTokenizerFast.from_pretrained(str(folder)), True
    tok = train_tokenizer(texts, vocab_size=vocab)
    tmp = _tmp_dir(folder)
    tok.save_pretrained(tmp)
    _publish(tmp, folder, {"fp": fp, "vocab": len(tok)}, ("tokenizer.json", "tokenizer_config.json"))
    return tok, False


# --- the entry point -------------------------------------------------------------------------

def _mixed_rows(code, arith, n: int, code_share: float, seed: int):
    """n training rows, a code_share of them drawn (with replacement) from the code rows."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    n_code = round(n * code_share)
    ic = torch.randint(0, code[0].shape[0], (n_code,), generator=gen)
    ia = torch.randint(0, arith[0].shape[0], (n - n_code,), generator=gen)
    return torch.cat([code[0][ic], arith[0][ia]]), torch.cat([code[1][ic], arith[1][ia]])


def _train_teacher(ts: TeacherSpec, tok, train_rows, eval_sets, progress) -> dict:
    import torch

    config = make_config(ts.arch, vocab_size=len(tok), hidden=ts.hidden, layers=ts.layers, heads=ts.heads,
                         kv_heads=ts.kv_heads, intermediate=ts.intermediate, max_pos=512, tokenizer=tok)
    model = build_model(config, seed=ts.seed)

    def heldout() -> dict[str, float]:
        return {name: round(eval_causal_lm(model, *rows), 4) for name, rows in eval_sets.items()}

    before = heldout()
    ids, mask = _mixed_rows(*train_rows, ts.steps * ts.batch_size, ts.code_share, ts.seed)
    bar = _Bar(progress, ts.name, ts.steps)
    t0 = time.monotonic()
    losses = train_causal_lm(model, ids, mask, ts.steps, ts.lr, ts.batch_size, ts.seed, on_step=bar.step)
    after = heldout()
    return {"model": model, "params": sum(p.numel() for p in model.parameters()),
            "untrained_by_dataset": before, "heldout_by_dataset": after,
            "untrained_loss": round(sum(before.values()) / len(before), 4),
            "heldout_loss": round(sum(after.values()) / len(after), 4),
            "final_train_loss": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4),
            "train_seconds": round(time.monotonic() - t0, 1), "threads": torch.get_num_threads()}


def _register(paths: Paths, ts: TeacherSpec, folder: Path, params: int) -> Path:
    """registry/<name>.json, rewritten only when its content changes (a rewrite is a TeacherUpdated)."""
    entry = {"teacher_id": ts.name, "path": os.path.relpath(folder, paths.home), "status": "ready",
             "params": format_params(params), "weight": 1.0, "datasets": [ARITH, CODE],
             "description": f"Nexus demo teacher ({ts.arch}, {ts.layers} layers, hidden {ts.hidden}), "
                            f"trained {int(ts.code_share * 100)}% on code"}
    if ts.primary:
        entry["primary"] = True
    if ts.sli:
        entry["sli"] = ts.sli
    target = paths.registry / f"{ts.name}.json"
    try:
        if json.loads(target.read_text()) == entry:
            return target
    except (OSError, ValueError):
        pass
    write_json(target, entry)
    return target


def prepare_demo(paths: Paths, cfg: Settings, console=None, spec: DemoSpec | None = None) -> dict:
    """Generate the demo datasets, train (or reuse) the two teachers, register them.

    Returns {teachers: {id: {path, params, heldout_loss, untrained_loss, ...}}, datasets: [...],
    tokenizer, seconds}. Losses are mean next-token cross-entropy (nats) on the held-out split,
    averaged over the two datasets; the per-dataset figures are in *_by_dataset.
    """
    t0 = time.monotonic()
    spec = spec or DemoSpec()
    frac = cfg.extract.heldout_fraction
    paths.registry.mkdir(parents=True, exist_ok=True)
    cache = paths.state_dir / "demo-cache"
    cache.mkdir(parents=True, exist_ok=True)

    # 1. Data (generated, or left alone when its marker matches).
    datasets = ensure_datasets(paths, spec.data)
    _say(console, "datasets ready", **{d["dataset"]: f"{d['rows']} rows" for d in datasets})

    # 2. One tokenizer for both teachers, trained on their pool (never on the datasets).
    data_fp = _fp([spec.data.arithmetic_fp(), spec.data.stdlib_fp(), spec.data.pool_fp(), frac])
    tok_fp = _fp([data_fp, spec.vocab_size])
    fps = {ts.name: _fp([tok_fp, asdict(ts), spec.seq_len, spec.eval_rows]) for ts in spec.teachers}
    folders = {ts.name: cache / ts.name for ts in spec.teachers}
    markers = {n: _read_marker(folders[n], fps[n]) for n in fps}

    todo = [ts for ts in spec.teachers if markers[ts.name] is None]
    if todo:
        texts = dataset_texts(paths)
        parts = {name: split(t, frac) for name, t in texts.items()}  # name -> (train, heldout)
        for name, (train, held) in parts.items():
            if not train or not held:
                raise DatasetError(f"demo dataset {name}: {len(train)} train / {len(held)} held-out documents "
                                   f"with --extract-heldout-fraction {frac}; both sides need documents, "
                                   "so raise the fraction or the demo's data size")
        pool = teacher_pool(spec.data, texts)
        tok, tok_cached = _tokenizer(cache, pool[CODE] + pool[ARITH], spec.vocab_size, tok_fp)
        _say(console, "tokenizer ready", vocab=len(tok), cached=tok_cached,
             pool=f"{len(pool[CODE])} code files, {len(pool[ARITH])} arithmetic rows")
        if not tok_cached:  # a fresh tokenizer invalidates every teacher: they must share one
            todo = list(spec.teachers)
        train_rows = (pack(tok, pool[CODE], spec.seq_len), pack(tok, pool[ARITH], spec.seq_len))
        eval_sets = {name: pack(tok, parts[name][1], spec.seq_len, spec.eval_rows) for name in (ARITH, CODE)}
        with _progress(console) as progress:
            for ts in todo:
                res = _train_teacher(ts, tok, train_rows, eval_sets, progress)
                model = res.pop("model")
                tmp = _tmp_dir(folders[ts.name])
                _quiet_save(model, tok, tmp)
                hashed = tuple(sorted(p.name for p in tmp.iterdir() if p.is_file()))
                _publish(tmp, folders[ts.name], {"fp": fps[ts.name], "teacher": asdict(ts), **res}, hashed)
                markers[ts.name] = json.loads((folders[ts.name] / MARKER).read_text())
                _say(console, f"trained {ts.name}", params=format_params(res["params"]),
                     heldout=res["heldout_loss"], untrained=res["untrained_loss"], seconds=res["train_seconds"])

    # 3. Register like any user's teacher.
    teachers = {}
    for ts in spec.teachers:
        m = markers[ts.name]
        _register(paths, ts, folders[ts.name], m["params"])
        teachers[ts.name] = {"path": str(folders[ts.name]), "params": m["params"],
                             "params_hint": format_params(m["params"]),
                             "heldout_loss": m["heldout_loss"], "untrained_loss": m["untrained_loss"],
                             "heldout_by_dataset": m["heldout_by_dataset"],
                             "untrained_by_dataset": m["untrained_by_dataset"],
                             "arch": ts.arch, "cached": ts not in todo}
    seconds = round(time.monotonic() - t0, 2)
    _say(console, "teachers registered", teachers=",".join(teachers), seconds=seconds)
    return {"teachers": teachers, "datasets": datasets, "tokenizer": str(cache / "tokenizer"), "seconds": seconds}
