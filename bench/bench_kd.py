"""KD vs plain cross-entropy at equal steps and data, on generated data with a tiny trained teacher.

    python bench/bench_kd.py [--steps 120] [--device cpu]

Prints a markdown table and writes bench/out/bench_kd.json. Reported: held-out loss of the
teacher, of a student trained with cross-entropy only (alpha=0) and of a KD student
(alpha=0.9, the default), both depth-pruned from the teacher, same steps, data and seed;
the share of the CE->teacher gap that KD closes; and KD step time / CE step time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kd_fixtures import make_teacher, settings, tokenizer_fp, write_datasets, write_shards  # noqa: E402
from nexus_core import data  # noqa: E402
from nexus_core.model_factory import train_tokenizer  # noqa: E402
from nexus_core.paths import Paths  # noqa: E402
from nexus_core.plan import DistillPlan  # noqa: E402
from nexus_core.stages.context import Control, StageContext  # noqa: E402
from nexus_core.stages.distill import run_distill  # noqa: E402
from nexus_core.student import decoder_layers  # noqa: E402


class StepTimer(StageContext):
    """poll() is called once per optimizer step: the gaps between calls are step times.

    Both wall time and this process's CPU time are kept: on a shared machine other processes
    inflate wall time unevenly, while CPU time counts only the work of this process.
    """

    def __init__(self):
        self.stamps = []

    def poll(self):
        self.stamps.append((time.perf_counter(), time.process_time()))
        return Control.CONTINUE

    def step_times(self, which: int = 0) -> list[float]:
        gaps = [b[which] - a[which] for a, b in zip(self.stamps, self.stamps[1:])]
        return gaps[5:]  # skip warm-up steps


def train_teacher(cfg, paths: Paths, teacher, tok, steps: int, device: str) -> list[float]:
    """Plain LM training of the teacher on the train split; returns its block influence per layer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher.path, dtype=torch.float32).to(device).train()
    texts = [t for d in cfg.run.datasets.split(",") for t in data.load_texts(paths, data.DatasetRef.parse(d))]
    train, _ = data.split(texts, cfg.extract.heldout_fraction)
    ids, mask = data.pack(tok, train, cfg.extract.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, ids.shape[0], (16,), generator=g)
        x, m = ids[idx].long().to(device), mask[idx].long().to(device)
        labels = x.masked_fill(m == 0, -100)
        loss = model(input_ids=x, attention_mask=m, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = 3e-3 * (0.1 + 0.9 * (1 - step / steps))
    # Block influence (1 - cos(layer input, output)) on a calibration batch, as the profile stage measures it.
    model.eval()
    infl, blocks = {}, decoder_layers(model)

    def hook(i):
        def fn(mod, args, kwargs, out):
            h_in, h_out = args[0] if args else kwargs["hidden_states"], out[0] if isinstance(out, tuple) else out
            infl[i] = float((1 - torch.cosine_similarity(h_in, h_out, dim=-1)).mean())
        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    with torch.no_grad():
        model(input_ids=ids[:16].long().to(device), attention_mask=mask[:16].long().to(device))
    for h in handles:
        h.remove()
    model.to("cpu").save_pretrained(teacher.path)
    return [infl[i] for i in range(len(blocks))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120, help="student optimizer steps (both students)")
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--alpha", type=float, default=0.9, help="KD student's alpha (the CE student has 0)")
    ap.add_argument("--temperature", type=float, default=1.0)
    args = ap.parse_args()
    out_dir = ROOT / "bench" / "out"
    work = out_dir / "kd_work"
    shutil.rmtree(work, ignore_errors=True)
    paths = Paths(work).ensure()
    datasets = ("code/python", "reasoning/arithmetic")
    texts = write_datasets(paths, 3000, datasets)
    tok = train_tokenizer([t for ts in texts.values() for t in ts], vocab_size=400)
    cfg = settings(work, run={"device": args.device, "datasets": ",".join(datasets)},
                   extract={"seq_len": 64, "top_k": 32, "max_samples": 256},
                   distill={"batch_size": 8, "max_steps": args.steps, "epochs": 1000, "warmup_steps": 10,
                            "lr": 2e-3, "checkpoint_every": 10_000, "alpha": args.alpha,
                            "temperature": args.temperature},
                   memory={"budget": "64GB"})
    t0 = time.perf_counter()
    teacher = make_teacher(paths, "teacher", tok, hidden=64, layers=4)
    importance = train_teacher(cfg, paths, teacher, tok, args.teacher_steps, args.device)
    from nexus_core.registry import _weight_files

    teacher = dataclasses.replace(teacher, weight_files=_weight_files(Path(teacher.path)))
    prof = {"teacher_id": "teacher", "teacher_fp": teacher.fingerprint(), "tokenizer_fp": tokenizer_fp(tok),
            "hidden": 64, "layers": 4, "mode": "full", "layer_importance": importance, "critical_layers": []}
    paths.profile("teacher").write_text(json.dumps(prof))
    for d in datasets:
        write_shards(cfg, paths, teacher, d, tok, shard_size=64)
    plan = DistillPlan(teachers=(teacher,), primary="teacher", datasets=datasets)
    setup_s = time.perf_counter() - t0

    results = {}
    for name, alpha in (("ce", 0.0), ("kd", cfg.distill.alpha)):
        run_home = out_dir / f"kd_{name}"
        shutil.rmtree(run_home, ignore_errors=True)
        shutil.copytree(work, run_home, ignore=shutil.ignore_patterns("models"))
        c = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, alpha=alpha))
        timer = StepTimer()
        res = run_distill(c, plan, Paths(run_home), timer)
        ev = res.data["eval"]
        tokens = sum(ev[d]["student"]["tokens"] for d in ev)
        loss = sum(ev[d]["student"]["loss"] * ev[d]["student"]["tokens"] for d in ev) / tokens
        t_loss = sum(ev[d]["teachers"]["teacher"]["loss"] * ev[d]["student"]["tokens"] for d in ev) / tokens
        times = sorted(timer.step_times())
        results[name] = {"alpha": alpha, "heldout_loss": loss, "teacher_heldout_loss": t_loss,
                         "step_time_s": statistics.median(times), "step_time_p10_s": times[len(times) // 10],
                         "step_cpu_time_s": statistics.median(timer.step_times(1)),
                         "per_dataset": ev}
    ce, kd, teacher_loss = results["ce"]["heldout_loss"], results["kd"]["heldout_loss"], results["ce"]["teacher_heldout_loss"]
    gap_closed = (ce - kd) / (ce - teacher_loss) if ce > teacher_loss else float("nan")
    ratio = results["kd"]["step_time_s"] / results["ce"]["step_time_s"]
    ratio_p10 = results["kd"]["step_time_p10_s"] / results["ce"]["step_time_p10_s"]
    ratio_cpu = results["kd"]["step_cpu_time_s"] / results["ce"]["step_cpu_time_s"]
    summary = {"command": "python bench/bench_kd.py " + " ".join(sys.argv[1:]), "device": args.device,
               "steps": args.steps, "teacher_steps": args.teacher_steps, "setup_s": round(setup_s, 1),
               "teacher_heldout_loss": teacher_loss, "ce_heldout_loss": ce, "kd_heldout_loss": kd,
               "gap_closed": gap_closed, "kd_over_ce_step_time": ratio,
               "kd_over_ce_step_time_p10": ratio_p10,
               "kd_over_ce_step_cpu_time": ratio_cpu, "runs": results,
               "targets": {"gap_closed": 0.85, "kd_over_ce_step_time": 1.10}}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_kd.json").write_text(json.dumps(summary, indent=2))
    print(f"| model | held-out loss | step time (ms) |\n|---|---|---|\n"
          f"| teacher (4 layers) | {teacher_loss:.4f} | |\n"
          f"| CE student (2 layers, alpha=0) | {ce:.4f} | {results['ce']['step_time_s'] * 1e3:.1f} |\n"
          f"| KD student (2 layers, alpha={cfg.distill.alpha}) | {kd:.4f} | {results['kd']['step_time_s'] * 1e3:.1f} |\n\n"
          f"| metric | value | target |\n|---|---|---|\n"
          f"| share of CE->teacher gap closed by KD | {gap_closed:.1%} | >= 85% |\n"
          f"| KD step time / CE step time (median) | {ratio:.3f}x | <= 1.10x |\n"
          f"| KD step time / CE step time (10th percentile) | {ratio_p10:.3f}x | <= 1.10x |\n"
          f"| KD step CPU time / CE step CPU time (median) | {ratio_cpu:.3f}x | <= 1.10x |\n")


if __name__ == "__main__":
    main()
