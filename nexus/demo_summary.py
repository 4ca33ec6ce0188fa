"""The end of `nexus run --baseline` (and of the demo): the plain fine-tune baseline, the report,
then a short summary of whether distillation paid off. The summary goes to stdout; what is
being done goes to stderr."""

from __future__ import annotations

import json
import sys

import structlog
from rich.console import Console
from rich.table import Table

from nexus_core.broker.keys import StageStatus
from nexus_core.config import Settings
from nexus_core.kd.baseline import run_ce_baseline, sweep_lrs
from nexus_core.paths import Paths
from nexus_core.records.events import load_state
from nexus_core.records.plan import DistillPlan

log = structlog.get_logger("nexus.demo")


def _last_distill(paths: Paths):
    state = load_state(paths)
    done = [s for s in state.stages.values() if s.stage == "distill" and s.status == StageStatus.DONE and s.spec]
    return max(done, key=lambda s: s.finished_ts or "") if done else None


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "-"


def summary_table(report: dict) -> Table:
    """Per domain: each teacher, the KD student, the tuned plain fine-tune and the share of the gap closed."""
    domains = report.get("domains") or {}
    units = {m.get("unit", "nats/token") for m in domains.values()}
    t = Table(title=f"held-out loss ({', '.join(sorted(units)) or 'nats/token'}, lower is better)",
              title_justify="left")
    teachers = sorted({tid for m in domains.values() for tid in m.get("teachers", {})})
    lr = next((m.get("baseline_lr") for m in domains.values() if m.get("baseline_lr")), None)
    for col in ("domain", *teachers, "KD student", f"plain fine-tune (lr {lr:g})" if lr else "plain fine-tune",
                "KD gap closed"):
        t.add_column(col)
    for dom, m in sorted(domains.items()):
        gap = m.get("kd_gap_closed")
        t.add_row(dom, *[_fmt(m.get("teachers", {}).get(x)) for x in teachers], _fmt(m.get("student")),
                  _fmt(m.get("ce_baseline")), f"{gap:.0%}" if isinstance(gap, (int, float)) else "-")
    return t


def baseline_and_summary(paths: Paths, cfg: Settings, demo: bool = False, console: Console | None = None) -> None:
    console = console or Console()  # stdout: the result of the run
    stage = _last_distill(paths)
    eval_path = paths.results / "eval.json"
    if stage is None or not eval_path.exists():
        print("baseline: no finished distillation to compare with", file=sys.stderr)
        return
    ev = json.loads(eval_path.read_text())
    plan = DistillPlan.from_dict(stage.spec["plan"])
    steps = int(ev.get("steps") or cfg.distill.max_steps)
    print(f"baseline: plain fine-tune at lr {', '.join(f'{x:g}' for x in sweep_lrs(cfg))} ({steps} steps each, "
          f"same student init and rows); the best is kept", file=sys.stderr, flush=True)
    run_ce_baseline(cfg, plan, paths, steps=steps, device=cfg.resolved_device())
    from nexus_core.records.report import build_report, collect

    try:
        build_report(paths)
    except Exception as exc:  # the summary still prints
        log.warning("report failed", error=str(exc))
    report = collect(paths)
    console.print(summary_table(report))
    router = paths.router_dir / "router.json"
    if router.exists():
        acc = json.loads(router.read_text()).get("heldout_accuracy")
        console.print(f"router held-out accuracy: {acc:.1%}" if isinstance(acc, (int, float)) else "router trained")
    if demo:
        console.print(f"student:  {paths.release}  (transformers AutoModelForCausalLM.from_pretrained)")
        console.print('try:      .venv/bin/nexus route "What is 23 + 19?"   and   .venv/bin/nexus status')
    if (paths.results / "report.md").exists():
        console.print(f"report:   {paths.results / 'report.md'}")
