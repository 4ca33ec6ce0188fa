"""The KD benches' workdirs (bench_kd, bench_xtok): the demo's kind of data, trained teachers, their profiles
and shards, cached by a spec's fingerprint; a run folder per distillation; the teacher's augmented rows
(extract.augment*) beside the cache."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nexus_core import data  # noqa: E402
from nexus_core.config import load_settings  # noqa: E402
from nexus_core.demo.demo_data import DataSpec, dataset_texts, ensure_datasets
from nexus_core.demo.model_factory import build_model, make_config, save_model, train_tokenizer
from nexus_core.kd.trainer import eval_causal_lm, train_causal_lm
from nexus_core.paths import Paths  # noqa: E402
from nexus_core.records.registry import Teacher, _weight_files
from nexus_core.stages.distill import run_distill  # noqa: E402
from nexus_core.stages.extract import run_extract  # noqa: E402
from nexus_core.stages.profile import run_profile  # noqa: E402

OUT = ROOT / "bench" / "out"
ARITH, CODE = "reasoning/arithmetic", "code/python-stdlib"
DATASETS = (CODE, ARITH)  # sorted, as DistillPlan keeps them
MARKER = "bench_marker.json"
SEEDS = (7, 8, 9, 10, 11)  # run.seed of the students (their data order); the first is the single-seed default


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything that makes the teacher and its shards (the cache key)."""

    arith_rows: int = 3000
    stdlib_bytes: int = 500_000
    stdlib_max_file: int = 12_000  # many small files, so the 5% hash split holds out several
    vocab: int = 768
    seq_len: int = 64
    hidden: int = 96
    layers: int = 4
    intermediate: int = 256
    teacher_steps: int = 2000  # 500 left arithmetic unlearned (see BENCHMARKS.md)
    teacher_batch: int = 16
    teacher_lr: float = 3e-3
    distill_sequences: int = 96  # extract.max_samples: the KD/CE data budget per domain
    top_k: int = 32

    def fp(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


QUICK = Spec(arith_rows=600, stdlib_bytes=150_000, stdlib_max_file=6_000, vocab=384, hidden=48, intermediate=128, teacher_steps=150,
             distill_sequences=24)


def settings(home: Path, spec, seed: int = SEEDS[0], student_layers: int = 0, augment: dict | None = None,
             **distill):
    """The bench's settings: `spec` sizes the data (seq_len, top_k, distill_sequences); knobs override distill."""
    d = {"batch_size": 8, "epochs": 1000, "checkpoint_every": 100_000, "keep_checkpoints": 1}
    d.update(distill)
    return load_settings(home, environ={}, run={"device": "cpu", "seed": seed},
                         extract={"seq_len": spec.seq_len, "top_k": spec.top_k, "max_samples": spec.distill_sequences,
                                  "shard_size": 64, "batch_size": 16,
                                  # no augmentation unless asked (the plain fine-tune's rows, the cache's shards)
                                  **(augment or {"augment": 0, "augment_samples": 0})},
                         distill=d, memory={"budget": "8GB"}, student={"layers": student_layers})


# --- shared by the KD benches: a cached workdir, the demo's data, a trained teacher, a distill run ---------

def cached_workdir(kind: str, spec, build, log) -> tuple[Path, dict]:
    """bench/out/<kind>/<spec fp>: built once by `build(home, spec, log) -> info`, then reused.

    A lock file serialises concurrent benchmark runs (e.g. bench/run_all.py and a manual run): the
    second waits and then reuses the first one's workdir. (The dir cannot be built under a temporary
    name and renamed: the teachers' fingerprints, stamped into profiles and shards, include their path.)
    """
    home = OUT / kind / spec.fp()
    home.parent.mkdir(parents=True, exist_ok=True)
    with open(home.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (home / MARKER).exists():
            return home, {**json.loads((home / MARKER).read_text()), "cached": True}
        shutil.rmtree(home, ignore_errors=True)
        info = build(home, spec, log)
        (home / MARKER).write_text(json.dumps(info, indent=1))
        return home, {**info, "cached": False}


def demo_splits(paths: Paths, spec, heldout_fraction: float) -> dict[str, tuple[list[str], list[str]]]:
    """The demo's two domains (as `nexus run --demo` makes them), each split (train, held-out)."""
    ensure_datasets(paths, DataSpec(arithmetic_rows=spec.arith_rows, stdlib_bytes=spec.stdlib_bytes,
                                    stdlib_max_file_bytes=spec.stdlib_max_file))
    return {k: data.split(v, heldout_fraction) for k, v in dataset_texts(paths).items()}


def train_teacher(home: Path, spec, name: str, arch: str, tok, ids: torch.Tensor, mask: torch.Tensor, seed: int, log,
                  **registry) -> tuple[Teacher, object]:
    """A `spec`-sized teacher of `arch` trained on the packed rows, saved under home/models/<name>."""
    config = make_config(arch, vocab_size=len(tok), hidden=spec.hidden, layers=spec.layers, heads=4, kv_heads=2,
                         intermediate=spec.intermediate, max_pos=spec.seq_len * 2, tokenizer=tok)
    model = build_model(config, seed=seed)
    log(f"training {name} ({arch}, {len(tok)} tokens): {spec.teacher_steps} steps on {ids.shape[0]} rows")
    losses = train_causal_lm(model, ids, mask, spec.teacher_steps, spec.teacher_lr, spec.teacher_batch, seed=seed)
    folder = home / "models" / name
    save_model(model, tok, folder)
    teacher = Teacher(teacher_id=name, path=str(folder.resolve()), status="ready", source=f"registry/{name}.json",
                      weight_files=_weight_files(folder), **registry)
    model.final_train_loss = sum(losses[-10:]) / 10
    return teacher, model


def profile_and_extract(cfg, teacher: Teacher, paths: Paths) -> dict:
    """run_profile, then run_extract on each of DATASETS; dataset -> its extract result data."""
    refs = [data.DatasetRef.parse(d) for d in DATASETS]
    run_profile(cfg, teacher, paths, refs)
    return {ref.key: run_extract(cfg, teacher, ref, paths).data for ref in refs}


def distill_run(home: Path, kind: str, name: str, cfg_for, plan):
    """run_distill from scratch in a run folder beside the cache that shares its read-only inputs
    (shards, datasets, profiles); `cfg_for(run_dir)` gives its settings. Returns (run dir, result, seconds);
    the caller reads what it needs and removes the folder."""
    run = OUT / kind / f"{name}-{os.getpid()}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    (run / "results").mkdir()
    for sub in ("memory", "datasets", "results/profiles"):
        os.symlink(home / sub, run / sub)
    t0 = time.perf_counter()
    res = run_distill(cfg_for(run), plan, Paths(run))
    return run, res, round(time.perf_counter() - t0, 1)


# --- bench_kd's workdir: one teacher on both domains ---------------------------------------------------

def prepare(spec: Spec, log) -> tuple[Path, dict]:
    """A workdir with datasets, a trained teacher, its profile and its shards; reused when complete."""
    return cached_workdir("kd_cache", spec, _build, log)


def _build(home: Path, spec: Spec, log) -> dict:
    paths = Paths(home).ensure()
    cfg = settings(home, spec)
    t0 = time.perf_counter()
    parts = demo_splits(paths, spec, cfg.extract.heldout_fraction)
    tok = train_tokenizer(parts[CODE][0] + parts[ARITH][0], vocab_size=spec.vocab)
    # The teacher sees every training row of both domains (more than the distillation budget).
    rows = [data.pack(tok, parts[d][0], spec.seq_len) for d in DATASETS]
    ids, mask = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
    teacher, model = train_teacher(home, spec, "teacher", "llama", tok, ids, mask, 11, log)
    held = {d: eval_causal_lm(model, *data.pack(tok, parts[d][1], spec.seq_len, 64)) for d in DATASETS}
    log("profile and extract (run_profile, run_extract)")
    profile_and_extract(cfg, teacher, paths)
    return {"teacher": teacher.to_dict(), "teacher_rows": int(ids.shape[0]),
            "teacher_final_train_loss": model.final_train_loss, "teacher_heldout": held,
            "setup_s": round(time.perf_counter() - t0, 1), "spec": dataclasses.asdict(spec)}


def prepare_augmented(home: Path, spec: Spec, teacher: Teacher, aug_settings: dict, log) -> Path:
    """The cached workdir plus the teacher's new rows near each domain's distillation sequences
    (extract.augment*, nexus_core/augment.py): run_extract again with the settings on keeps the real
    shards and adds the new rows, as a user's rerun does."""
    aug = home.with_name(home.name + "-aug-" + "-".join(f"{k}{v:g}" for k, v in sorted(aug_settings.items())))
    with open(aug.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (aug / MARKER).exists():
            shutil.rmtree(aug, ignore_errors=True)
            for sub in ("datasets", "memory", "results"):
                shutil.copytree(home / sub, aug / sub)
            os.symlink(home / "models", aug / "models")  # answer_split reads the tokenizer there
            log(f"extracting new rows near each domain's distillation sequences: {aug_settings}")
            cfg = settings(aug, spec, augment=aug_settings)
            for d in DATASETS:
                run_extract(cfg, teacher, data.DatasetRef.parse(d), Paths(aug))
            (aug / MARKER).write_text("{}")
    return aug
