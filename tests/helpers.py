"""Helpers the tests share (fixtures live in conftest.py). Import them as `from tests.helpers import ...`."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from nexus_core import data
from nexus_core.config import load_settings
from nexus_core.context import Control, StageContext
from nexus_core.data import DatasetRef
from nexus_core.demo.model_factory import build_model, make_config, save_model, train_tokenizer
from nexus_core.paths import Paths
from nexus_core.records.events import Event, read_events
from nexus_core.records.plan import DistillPlan
from nexus_core.records.registry import Teacher, _weight_files, parse_teacher
from nexus_core.stages.profile import run_profile
from nexus_core.storage.atomic import sha256_file

# --- data and workdirs -------------------------------------------------------------------------------

ARITH = [f"What is {a} + {b}?\n{a} + {b} = {a + b}" for a in range(3, 60, 2) for b in range(5, 40, 3)]


CODE = [f"def add_{i}(x, y):\n    return x + y + {i}\n\n\nclass Box{i}:\n    value = {i}\n" for i in range(150)]


# Tests state "no augmentation" explicitly: their datasets are all small, where extract.augment's automatic rule
# (nexus_core/kd/augment.py) would turn it on and multiply the teacher passes; only the rule's own tests leave it on.
NO_AUGMENT = {"NEXUS_EXTRACT_AUGMENT": "0", "NEXUS_EXTRACT_AUGMENT_SAMPLES": "0"}

FAST_SETTINGS = {
    "NEXUS_EXTRACT_SEQ_LEN": "32", "NEXUS_EXTRACT_MAX_SAMPLES": "24", "NEXUS_EXTRACT_SHARD_SIZE": "8",
    "NEXUS_EXTRACT_TOP_K": "8", "NEXUS_EXTRACT_BATCH_SIZE": "4", "NEXUS_PROFILE_CALIBRATION_SAMPLES": "4",
    "NEXUS_DISTILL_MAX_STEPS": "6", "NEXUS_DISTILL_BATCH_SIZE": "4", "NEXUS_DISTILL_CHECKPOINT_EVERY": "2",
    "NEXUS_DISTILL_WARMUP_STEPS": "1", "NEXUS_ROUTER_EPOCHS": "5", "NEXUS_ROUTER_MAX_SAMPLES": "40",
    **NO_AUGMENT,
}


def write_dataset(paths: Paths, key: str, rows: list[dict]) -> Path:
    cat, name = key.split("/")
    folder = paths.datasets / cat / name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "data.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return folder


def register(paths: Paths, teacher_id: str, model_dir: Path, **extra) -> Path:
    body = {"teacher_id": teacher_id, "path": str(model_dir), "status": "ready", **extra}
    f = paths.registry / f"{teacher_id}.json"
    f.write_text(json.dumps(body))
    return f


# --- the real CLI as a subprocess, and waiting on the event log --------------------------------------

def nexus_env(paths, redis_url: str | None, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_") and k != "REDIS_URL"}
    env.update({"NEXUS_HOME": str(paths.home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.update(NO_AUGMENT)  # the automatic rule would augment every tiny test dataset (slow): off unless a test asks
    if redis_url:
        env["REDIS_URL"] = redis_url
    env.update(extra or {})
    return env


def nexus(paths, *args, redis_url=None, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nexus", *args], env=nexus_env(paths, redis_url, env_extra),
                          cwd=paths.home, capture_output=True, text=True, timeout=timeout)


class _Output:
    """A child's output in a temporary file, read back with .read(). Not a pipe: a pipe nobody reads
    fills (64 KiB) and blocks the child mid-write, where it can no longer act on SIGTERM."""

    def __init__(self):
        self._f = tempfile.TemporaryFile(mode="w+", errors="replace")

    def fileno(self) -> int:
        return self._f.fileno()

    def read(self) -> str:
        self._f.seek(0)
        return self._f.read()

    def close(self) -> None:
        self._f.close()


def spawn(paths, *args, redis_url=None, env_extra=None) -> subprocess.Popen:
    out = _Output()
    proc = subprocess.Popen([sys.executable, "-m", "nexus", *args], env=nexus_env(paths, redis_url, env_extra),
                            cwd=paths.home, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    proc.stdout = out
    return proc


def kill_tree(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_for(paths, predicate, timeout=240, proc: subprocess.Popen | None = None):
    """Poll the event log until predicate(events) is truthy; returns its value."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            events = read_events(paths.log)
        except Exception:
            events = []
        value = predicate(events)
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited with {proc.returncode} before the condition held:\n{out[-3000:]}")
        time.sleep(0.1)
    raise AssertionError("timed out waiting for the event log")


def of_type(events, type_, stage=None):
    return [e for e in events if e.type == type_ and (stage is None or e.stage == stage)]


def artefact_bytes(paths, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(paths.home)): p.read_bytes() for p in sorted(Path(paths.home).glob(pattern))}


# --- stage functions without Redis (extract, profile) ------------------------------------------------

DOCS = [f"<<{i:04d}>> {i} plus {i * 3 % 17} is {i + i * 3 % 17}. the cat sat on mat {i % 7}." for i in range(160)]


PADDED_VOCAB = 320


K = 8


class Recorder(StageContext):
    """Records every call; `stop_after` shards done -> poll() answers STOP_USR1."""

    def __init__(self, stop_after: int | None = None, script: dict | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.stop_after = stop_after
        self.script = script or {}  # poll number -> Control
        self.polls = 0

    def started(self, **d): self.calls.append(("started", d))
    def progress(self, **d): self.calls.append(("progress", d))
    def oom_recovered(self, **d): self.calls.append(("oom", d))
    def checkpoint_saved(self, step, reason, path=None): self.calls.append(("checkpoint", {"step": step, "reason": reason}))

    def wait_while_paused(self): self.calls.append(("waited", {}))

    def poll(self):
        self.polls += 1
        if self.polls in self.script:
            return self.script[self.polls]
        done = sum(1 for c in self.calls if c[0] == "progress")
        return Control.STOP_USR1 if self.stop_after is not None and done >= self.stop_after else Control.CONTINUE

    def of(self, kind):
        return [d for c, d in self.calls if c == kind]


def setup_home(home: Path, teacher_dir: Path, docs=DOCS, **sections):
    """Dataset + settings + teacher + profile in a fresh NEXUS_HOME."""
    folder = home / "datasets" / "reasoning" / "arith"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    base = {"run": {"device": "cpu"}, "profile": {"calibration_samples": 4},
            "extract": {"seq_len": 32, "top_k": K, "batch_size": 4, "shard_size": 8, "max_samples": 0,
                        "logit_chunk": 48, "augment": 0, "augment_samples": 0}}
    for sec, kv in sections.items():
        base.setdefault(sec, {}).update(kv)
    cfg = load_settings(home=home, environ={}, **base)
    teacher = parse_teacher({"teacher_id": "tiny", "path": str(teacher_dir), "status": "ready"}, "test", home)
    ref = DatasetRef("reasoning", "arith")
    run_profile(cfg, teacher, Paths(home), [ref])
    return cfg, teacher, ref, Paths(home)


def shard_files(paths: Paths) -> dict[str, bytes]:
    d = paths.shard_dir("tiny", "reasoning__arith")
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*.safetensors"))}


# --- faults: reference outputs and what a faulted run must reproduce ---------------------------------

SHARDS = "memory/*/*/shard-*.safetensors"


WEIGHTS = "nexus-release-v1/*.safetensors"


STAGES = ("profile", "extract", "distill", "router")


ENV = dict(FAST_SETTINGS)


def make_workdir(root: Path, teacher_dir: Path) -> Paths:
    """The demo_workdir layout (2 datasets, teacher `tiny`), without touching os.environ."""
    paths = Paths(Path(root) / "home").ensure()
    write_dataset(paths, "reasoning/arith", [{"question": q.split("\n")[0], "answer": q.split("\n")[1]} for q in ARITH])
    write_dataset(paths, "code/snippets", [{"text": t} for t in CODE])
    register(paths, "tiny", teacher_dir)
    return paths


def outputs(paths: Paths) -> dict[str, bytes]:
    """What must be identical to an undisturbed run: every shard and the released weights."""
    home = Path(paths.home)
    files = sorted(home.glob(SHARDS)) + sorted(home.glob(WEIGHTS))
    return {str(p.relative_to(home)): p.read_bytes() for p in files}


def assert_same_outputs(paths: Paths, reference: dict[str, bytes]) -> None:
    got = outputs(paths)
    assert sorted(got) == sorted(reference), (sorted(got), sorted(reference))
    differ = [k for k in reference if got[k] != reference[k]]
    assert not differ, f"differ from the undisturbed run: {differ}"


def completed_once(paths: Paths) -> list[Event]:
    """Log gapless (read_events checks seq), each job completed exactly once, whole plan done."""
    events = read_events(paths.log)
    per_job: dict[str, int] = {}
    for e in of_type(events, "StageCompleted"):
        per_job[e.job_id] = per_job.get(e.job_id, 0) + 1
    assert all(n == 1 for n in per_job.values()), f"a stage completed twice: {per_job}"
    done = {s: len(of_type(events, "StageCompleted", s)) for s in STAGES}
    assert done == {"profile": 1, "extract": 2, "distill": 1, "router": 1}, done
    return events


def no_temp_files(paths: Paths) -> list[str]:
    """Leftover atomic-write temp files (`.<name>.<rand>.tmp`) anywhere under the workdir."""
    return [str(p) for p in Path(paths.home).rglob(".*.tmp")]


def kill_embedded_redis(paths: Paths) -> None:
    """kill -9 the workdir's embedded redis-server (it runs in its own session)."""
    pid_file = paths.redis_dir / "pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- bad model folders (they pass the registry, must fail at load) -----------------------------------

class _Trap:
    """Unpickling this touches a marker file: proof that a .bin was (or was not) loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _copy_teacher(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def bad_model_folders(root: Path, teacher: Path, markers: Path) -> dict[str, Path]:
    """Model folders that pass the registry's file checks but must fail at load (profile)."""
    out = {}
    # config.json that does not match its weights (wider hidden size than the tensors)
    d = _copy_teacher(teacher, root / "mismatch")
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = cfg["hidden_size"] * 2
    (d / "config.json").write_text(json.dumps(cfg))
    out["mismatch"] = d
    # absurd sizes with the weights of a small model: refused from the headers, before any allocation
    for name, field, value in (("layers", "num_hidden_layers", 1_000_000), ("wide", "intermediate_size", 10**9)):
        d = _copy_teacher(teacher, root / name)
        cfg = json.loads((d / "config.json").read_text())
        cfg[field] = value
        (d / "config.json").write_text(json.dumps(cfg))
        out[name] = d
    # a tokenizer that fails to load
    d = _copy_teacher(teacher, root / "badtok")
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "NoSuchModel"')
    out["badtok"] = d
    # custom model code, trust_remote_code absent: the code must never run
    d = _copy_teacher(teacher, root / "remote")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="nexus-custom-arch", architectures=["CustomForCausalLM"],
               auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                         "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    trap = f"import pathlib\npathlib.Path({str(markers / 'remote-code-ran')!r}).touch()\n"
    (d / "configuration_custom.py").write_text(trap)
    (d / "modeling_custom.py").write_text(trap)
    out["remote"] = d
    # pickle-only weights: refused, never unpickled
    d = _copy_teacher(teacher, root / "pickled")
    for f in d.glob("*.safetensors"):
        f.unlink()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(markers / "pickle-ran")))
    out["pickled"] = d
    # not a model folder at all
    (root / "empty").mkdir()
    out["empty"] = root / "empty"
    return out


# --- tiny KD workdirs: datasets, teachers, profiles and shards written directly (no extract stage) ---

def arithmetic_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        out.append(f"{a} {op} {b} = {eval(f'{a}{op}{b}')}")
    return out


def python_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    names = ["alpha", "beta", "count", "items", "value", "result", "node", "key", "path", "data"]
    out = []
    for i in range(n):
        f, a, b = rng.choice(names), rng.choice(names), rng.choice(names)
        out.append(f"def {f}_{i}({a}, {b}):\n    if {a} is None:\n        return {b}\n"
                   f"    return [{a} for {b} in {a}.{rng.choice(names)}()]\n")
    return out


DATASETS = {"reasoning/arithmetic": arithmetic_texts, "code/python": python_texts}


def tokenizer_fp(tok) -> str:
    return hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()


def settings(home: Path, **sections):
    base = {"run": {"device": "cpu", "seed": 7}, "extract": {"seq_len": 32, "top_k": 8, "max_samples": 24, "augment": 0,
                                                             "augment_samples": 0},
            "distill": {"batch_size": 4, "max_steps": 8, "epochs": 100, "warmup_steps": 2, "lr": 3e-3,
                        "checkpoint_every": 3, "keep_checkpoints": 2},
            "memory": {"budget": "8GB"}}
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return load_settings(home, environ={}, **base)


def write_datasets(paths: Paths, n_docs: int = 300, names=tuple(DATASETS)) -> dict[str, list[str]]:
    out = {}
    for key in names:
        cat, name = key.split("/")
        folder = paths.dataset_dir(cat, name)
        folder.mkdir(parents=True, exist_ok=True)
        texts = DATASETS[key](n_docs)
        with open(folder / "data.jsonl", "w") as fh:
            for t in texts:
                fh.write(json.dumps({"text": t}) + "\n")
        out[key] = texts
    return out


def make_teacher(paths: Paths, teacher_id: str, tok, seed: int = 0, layers: int = 4, hidden: int = 32,
                 weight: float = 1.0, datasets=None) -> Teacher:
    folder = paths.home / "models" / teacher_id
    cfg = make_config("llama", vocab_size=len(tok), hidden=hidden, layers=layers, heads=4, kv_heads=2,
                      tokenizer=tok, max_pos=64)
    save_model(build_model(cfg, seed=seed), tok, folder)
    return Teacher(teacher_id=teacher_id, path=str(folder.resolve()), status="ready", source=f"registry/{teacher_id}.json",
                   weight=weight, datasets=datasets, weight_files=_weight_files(folder))


def write_profile(paths: Paths, teacher: Teacher, tok, importance: list[float], critical: list[int], hidden: int = 32):
    paths.profiles.mkdir(parents=True, exist_ok=True)
    prof = {"teacher_id": teacher.teacher_id, "teacher_fp": teacher.fingerprint(), "tokenizer_fp": tokenizer_fp(tok),
            "layers": len(importance), "hidden": hidden, "head_vocab": len(tok), "tokenizer_vocab": len(tok),
            "mode": "full", "layer_importance": importance, "critical_layers": critical}
    paths.profile(teacher.teacher_id).write_text(json.dumps(prof))


@torch.no_grad()
def write_shards(cfg, paths: Paths, teacher: Teacher, dataset: str, tok, shard_size: int = 10,
                 hidden_layers: tuple[int, ...] = ()) -> Path:
    """Teacher forward on the train split, top-k + tail, written as interfaces.md says."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher.path, dtype=torch.float32).eval()
    texts = data.load_texts(paths, data.DatasetRef.parse(dataset))
    train, held = data.split(texts, cfg.extract.heldout_fraction)
    ids, mask = data.pack(tok, train, cfg.extract.seq_len, cfg.extract.max_samples)
    out = model(input_ids=ids.long(), attention_mask=mask.long(), output_hidden_states=True)
    logp = F.log_softmax(out.logits[..., :len(tok)].float(), dim=-1)  # (n, T, V)
    top, idx = logp.topk(cfg.extract.top_k, dim=-1)
    tail = torch.logsumexp(logp.scatter(-1, idx, float("-inf")), dim=-1).clamp(min=math.log(1e-30))
    folder = paths.shard_dir(teacher.teacher_id, data.DatasetRef.parse(dataset).slug)
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, s in enumerate(range(0, ids.shape[0], shard_size)):
        sl = slice(s, s + shard_size)
        tensors = {"input_ids": ids[sl].contiguous(), "attention_mask": mask[sl].contiguous(),
                   "topk_ids": idx[sl].to(torch.int32).contiguous(), "topk_logprobs": top[sl].half().contiguous(),
                   "tail_logmass": tail[sl].float().contiguous()}
        for layer in hidden_layers:  # hidden_states[i + 1] is decoder layer i's output (last one after the norm)
            tensors[f"hidden.{layer}"] = out.hidden_states[layer + 1][sl].half().contiguous()
        f = folder / f"shard-{i:05d}.safetensors"
        save_file(tensors, str(f))
        shards.append({"file": f.name, "sequences": int(tensors["input_ids"].shape[0]),
                       "tokens": int(tensors["attention_mask"].sum()), "sha256": sha256_file(f)})
    manifest = {"version": 1, "teacher_id": teacher.teacher_id, "teacher_fp": teacher.fingerprint(),
                "dataset": dataset, "tokenizer_fp": tokenizer_fp(tok), "mode": "full", "k": cfg.extract.top_k,
                "seq_len": cfg.extract.seq_len, "hidden_layers": list(hidden_layers), "tokenizer_vocab": len(tok),
                "settings_fp": "test", "complete": True, "total_sequences": int(ids.shape[0]), "shards": shards,
                "kept_mass": {"mean": float((1 - tail.exp()).mean()), "p5": 0.0},
                "documents": {"train": len(train), "heldout": len(held)}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def build_workdir(home: Path, teachers=("t1",), datasets=("reasoning/arithmetic",), n_docs: int = 300,
                  hidden_layers: tuple[int, ...] = (), **cfg_sections):
    """Datasets, one shared tokenizer, teachers, profiles and shards. Returns (cfg, plan, paths, tok)."""
    paths = Paths(home).ensure()
    texts = write_datasets(paths, n_docs, datasets)
    tok = train_tokenizer([t for ts in texts.values() for t in ts], vocab_size=300)
    cfg = settings(home, **cfg_sections)
    made = []
    for i, tid in enumerate(teachers):
        t = make_teacher(paths, tid, tok, seed=i)
        write_profile(paths, t, tok, importance=[0.9, 0.1, 0.5, 0.3], critical=[0, 2])
        for d in datasets:
            write_shards(cfg, paths, t, d, tok, hidden_layers=hidden_layers)
        made.append(t)
    plan = DistillPlan(teachers=tuple(made), primary=teachers[0], datasets=tuple(sorted(datasets)))
    return cfg, plan, paths, tok


def wait_until(predicate, timeout: float = 60.0, what: str = "the condition", step: float = 0.02):
    """Poll `predicate()` (Redis, files, a thread's results) until it is truthy; its value, or AssertionError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
