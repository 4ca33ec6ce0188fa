"""The end of `nexus run --demo`: the plain fine-tune baseline, then a short summary."""

from __future__ import annotations

import json

import structlog
from rich.console import Console
from rich.table import Table

from nexus_core.broker.keys import StageStatus
from nexus_core.config import Settings
from nexus_core.kd.baseline import run_ce_baseline
from nexus_core.paths import Paths
from nexus_core.records.events import load_state
from nexus_core.records.plan import DistillPlan

log = structlog.get_logger("nexus.demo")


def _last_distill(paths: Paths):
    state = load_state(paths)
    done = [s for s in state.stages.values() if s.stage == "distill" and s.status == StageStatus.DONE and s.spec]
    return max(done, key=lambda s: s.finished_ts or "") if done else None


def demo_summary(paths: Paths, cfg: Settings, console: Console | None = None) -> None:
    console = console or Console(stderr=True)
    stage = _last_distill(paths)
    eval_path = paths.results / "eval.json"
    if stage is None or not eval_path.exists():
        console.print("demo: no finished distillation to summarise")
        return
    ev = json.loads(eval_path.read_text())
    plan = DistillPlan.from_dict(stage.spec["plan"])
    console.print(f"demo: training the plain fine-tune baseline ({ev.get('steps')} steps, same student and data)...")
    base = run_ce_baseline(cfg, plan, paths, steps=int(ev.get("steps") or cfg.distill.max_steps))
    try:
        from nexus_core.records.report import build_report

        build_report(paths)
    except Exception as exc:  # the summary still prints
        log.warning("report failed", error=str(exc))
    t = Table(title="held-out loss (nats/token, lower is better)", title_justify="left")
    teachers = sorted({tid for d in ev["datasets"].values() for tid in d.get("teachers", {})})
    for col in ("domain", *teachers, "KD student", "plain fine-tune", "KD gap closed"):
        t.add_column(col)
    for dom, d in sorted(ev["datasets"].items()):
        tl = [d.get("teachers", {}).get(x, {}).get("loss") for x in teachers]
        kd = d.get("student", {}).get("loss")
        ce = base["datasets"].get(dom, {}).get("loss")
        best = min((x for x in tl if x is not None), default=None)
        gap = f"{(ce - kd) / (ce - best):.0%}" if None not in (kd, ce, best) and ce - best > 1e-9 else "-"
        t.add_row(dom, *[f"{x:.3f}" if x is not None else "-" for x in tl], f"{kd:.3f}" if kd else "-",
                  f"{ce:.3f}" if ce else "-", gap)
    console.print(t)
    router = paths.router_dir / "router.json"
    if router.exists():
        acc = json.loads(router.read_text()).get("heldout_accuracy")
        console.print(f"router held-out accuracy: {acc:.1%}" if isinstance(acc, (int, float)) else "router trained")
    console.print(f"student:  {paths.release}  (transformers AutoModelForCausalLM.from_pretrained)")
    console.print('try:      .venv/bin/nexus route "What is 23 + 19?"   and   .venv/bin/nexus status')
    if (paths.results / "report.md").exists():
        console.print(f"report:   {paths.results / 'report.md'}")
