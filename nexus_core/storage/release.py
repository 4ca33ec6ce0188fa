"""nexus-release-v1/: a Hugging Face model folder (safetensors, config, tokenizer, generation
config) with a README.md model card. Written into a staging folder, then moved in file by file
(each move atomic), so a crash never leaves a half-written weight file in the release.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from nexus_core.paths import Paths
from nexus_core.storage.atomic import write_text


def model_card(info: dict) -> str:
    """README.md: what the student is, what it learnt from, how long, how well (held-out)."""
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [distillation, nexus]", "---", "",
        "# nexus-release-v1", "",
        "A student language model distilled by Nexus from the teachers below on their stored top-k "
        "distributions (KL with an explicit tail bucket, plus cross-entropy on the data).", "",
        "## Teachers", "", "| teacher | weight | primary |", "|---|---|---|",
    ]
    for t in info["teachers"]:
        lines.append(f"| {t['teacher_id']} | {t['weight']} | {'yes' if t['teacher_id'] == info['primary'] else ''} |")
    s = info["student"]
    lines += ["", "## Student", "",
              f"- built from: {s['source']}" + (f" (teacher layers kept: {s['kept_layers']} of {s['teacher_layers']})"
                                                if s.get("kept_layers") else ""),
              f"- parameters: {s.get('params', 0):,}",
              f"- training steps: {info['steps']} (plan {info['plan_fp']})",
              f"- temperature {info['temperature']}, alpha {info['alpha']}", "",
              "## Datasets", ""]
    lines += [f"- {d}" for d in info["datasets"]]
    lines += ["", "## Held-out metrics", "", "| dataset | model | loss | perplexity | tokens |", "|---|---|---|---|---|"]
    for d, row in sorted(info["eval"].items()):
        lines.append(f"| {d} | student | {row['student']['loss']:.4f} | {row['student']['perplexity']:.2f} | {row['student']['tokens']} |")
        for tid, m in sorted(row["teachers"].items()):
            lines.append(f"| {d} | {tid} (teacher) | {m['loss']:.4f} | {m['perplexity']:.2f} | {m['tokens']} |")
    lines += ["", "## Use", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              'tok = AutoTokenizer.from_pretrained("nexus-release-v1")',
              'model = AutoModelForCausalLM.from_pretrained("nexus-release-v1")',
              'out = model.generate(**tok("1 + 2 =", return_tensors="pt"), max_new_tokens=16)',
              "print(tok.decode(out[0]))", "```", ""]
    return "\n".join(lines)


def write_release(paths: Paths, model, tokenizer, info: dict) -> list[Path]:
    """Save the student as an HF folder plus model card; returns every file in the release."""
    from transformers import GenerationConfig

    staging = paths.state_dir / "release-staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        max_new_tokens=64, do_sample=False)
    model.save_pretrained(staging)  # safetensors
    tokenizer.save_pretrained(staging)
    write_text(staging / "README.md", model_card(info))
    dest = paths.release
    dest.mkdir(parents=True, exist_ok=True)
    names = {p.name for p in staging.iterdir() if p.is_file()}
    for p in sorted(staging.iterdir()):
        if p.is_file():
            os.replace(p, dest / p.name)
    for p in dest.iterdir():  # files of an older release (e.g. more weight shards) would mislead loaders
        if p.is_file() and p.name not in names:
            p.unlink()
    shutil.rmtree(staging, ignore_errors=True)
    return sorted(dest / n for n in names)
