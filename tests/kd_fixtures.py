"""Tiny workdirs for the distill and router tests: datasets, teachers, profiles and shards.

The shards are written here, by a small teacher forward, exactly in the interfaces.md format,
so these tests do not depend on the extract stage.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from nexus_core import data
from nexus_core.atomic import sha256_file
from nexus_core.config import load_settings
from nexus_core.model_factory import build_model, make_config, save_model, train_tokenizer
from nexus_core.paths import Paths
from nexus_core.plan import DistillPlan
from nexus_core.registry import Teacher, _weight_files


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
    base = {"run": {"device": "cpu", "seed": 7}, "extract": {"seq_len": 32, "top_k": 8, "max_samples": 24},
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
