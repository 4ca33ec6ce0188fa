"""Typed settings: one source of truth for nexus.toml, NEXUS_<SECTION>_<KEY> and CLI flags.

Precedence (later wins): built-in defaults < nexus.toml < environment < command-line flags.
Each field's `help` becomes the CLI flag's help; unknown keys are errors that name the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from nexus_core.errors import ConfigError


def setting(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class RunSettings:
    sli: str = setting("auto", "sequential layer ingestion: auto, always or never", ("auto", "always", "never"))
    device: str = setting("auto", "cuda, cpu or auto (cuda when present)")
    datasets: str = setting("all", "datasets to use: all, or category/name,category/name")
    models: str = setting("", "teacher ids to use (comma separated); empty means every ready teacher")
    seed: int = setting(1234, "seed for data order, initialisation and sampling")
    job_timeout_s: int = setting(6 * 3600, "RQ job_timeout of every stage job, seconds")


@dataclass
class ExtractSettings:
    seq_len: int = setting(128, "tokens per packed sequence")
    top_k: int = setting(32, "teacher log-probabilities kept per position")
    batch_size: int = setting(8, "sequences per teacher forward")
    max_samples: int = setting(2000, "at most this many packed sequences per dataset (0 = all)")
    shard_size: int = setting(256, "sequences per shard file")
    heldout_fraction: float = setting(0.05, "share of each dataset held out for evaluation (hash split)")
    logit_chunk: int = setting(0, "positions per full-vocabulary logits chunk (bounds memory); 0: as many as fit "
                               "in 32 MiB of float32 logits")
    save_hidden: bool = setting(False, "also store hidden states of the profile's critical layers")
    text_field: str = setting("", "dataset text column; empty: text, prompt+response or question+answer")
    ranges: int = setting(1, "jobs per (teacher, dataset), each extracting a contiguous block of shards, so that "
                          "several workers (one per GPU) share one dataset; the shards are the same for any value")
    augment: int = setting(-1, "teacher-perturbed copies of each training sequence, labelled by the teacher too: "
                           "more distillation inputs near the data (costs this many more teacher passes); -1 = auto: "
                           "16 when a dataset packs to fewer than 512 training sequences, else 0; 0 = off")
    augment_p: float = setting(0.15, "share of tokens a perturbed copy replaces with a sample from the teacher")
    augment_samples: int = setting(-1, "continuations of each training sequence's first tokens sampled from the "
                                   "teacher, labelled by it too (one teacher pass per new token, no KV cache); -1 = "
                                   "auto: 8 when a dataset packs to fewer than 128 training sequences and the teacher "
                                   "is loaded whole (profile mode full; never when SLI-streamed), else 0; 0 = off")
    augment_temperature: float = setting(0.8, "temperature of those samples")

    def __post_init__(self):
        if self.ranges < 1:
            raise ConfigError(f"--extract-ranges must be >= 1, not {self.ranges}")
        if self.augment < -1 or not 0.0 < self.augment_p < 1.0:
            raise ConfigError("--extract-augment must be >= 0 (or -1: auto) and --extract-augment-p in (0, 1)")
        if self.augment_samples < -1 or self.augment_temperature <= 0:
            raise ConfigError("--extract-augment-samples must be >= 0 (or -1: auto) and "
                              "--extract-augment-temperature > 0")


@dataclass
class ProfileSettings:
    calibration_samples: int = setting(16, "sequences used to measure layer importance")
    critical_ratio: float = setting(0.25, "share of layers ranked critical by block influence")


@dataclass
class StudentSettings:
    layer_ratio: float = setting(0.0, "share of the primary teacher's layers the student keeps; 0 = auto: with "
                                 "--student-params the depth (all, 3/4 or 1/2 of the layers) whose width-pruned "
                                 "student has the lowest cross-entropy on calibration rows, else 0.5")
    layers: int = setting(0, "layers the student keeps (overrides layer_ratio when > 0)")
    config: str = setting("", "HF config.json path for a student built from scratch (empty: depth-prune)")
    params: str = setting("", "student size: a count such as 60M or 1.2B, or a share of the primary teacher "
                          "such as 0.5; the kept layers are then width-pruned (MLP channels, then KV head "
                          "groups, then hidden channels) to at most that many parameters (empty: depth only)")

    def __post_init__(self):
        if not 0.0 <= self.layer_ratio <= 1.0 or self.layers < 0:
            raise ConfigError(f"--student-layer-ratio must be in (0, 1], or 0: auto (not {self.layer_ratio}), and "
                              f"--student-layers >= 0 (not {self.layers})")
        if self.params:
            try:
                n = parse_count(self.params)
            except ValueError:
                n = 0
            if n <= 0:
                raise ConfigError(f"--student-params {self.params!r}: use a count such as 60M or 1.2B, or a share "
                                  f"of the primary teacher such as 0.5")


@dataclass
class DistillSettings:
    epochs: int = setting(1, "passes over the training shards (max_steps wins when reached first)")
    max_steps: int = setting(800, "optimizer steps (0 = epochs decide); 800: what a pretrained, pruned student "
                             "needs to take in a small dataset with its automatic augmentation (bench_kd: 88 % / 92 % "
                             "of the gap to the teacher closed, 66 % / 59 % at 200)")
    batch_size: int = setting(8, "sequences per micro-batch")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    lr: float = setting(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = setting(0.01, "AdamW weight decay")
    warmup_steps: int = setting(10, "linear warm-up steps before cosine decay")
    grad_clip: float = setting(1.0, "gradient norm clip (0 = off)")
    temperature: float = setting(1.0, "distillation temperature")
    alpha: float = setting(0.9, "weight of the KD term; 1 - alpha weighs cross-entropy")
    hidden_weight: float = setting(0.0, "weight of the hidden-state loss on critical layers")
    checkpoint_every: int = setting(50, "steps between periodic checkpoints")
    keep_checkpoints: int = setting(3, "numbered checkpoints kept besides checkpoint_latest.pt")
    grad_checkpointing: bool = setting(False, "trade compute for memory in the student")
    nproc: int = setting(1, "processes (one GPU each, cuda:k..cuda:k+N-1 from --device cuda:k) that distill "
                         "together under torchrun; the global batch stays batch_size x grad_accum, so results "
                         "and checkpoints do not depend on it")
    xtok_loss: str = setting("hybrid", "loss for teachers with another tokenizer: hybrid (shared-token KL + ULD on "
                             "the rest), shared (KL on shared tokens only) or uld (sorted-probability only)",
                             ("hybrid", "shared", "uld"))
    xtok_align: str = setting("token", "cross-tokenizer position alignment: token (the next tokens have the same "
                              "text) or boundary (they only start at the same character)", ("token", "boundary"))
    xtok_uld_weight: float = setting(1.0, "weight of the sorted-probability (ULD) term for cross-tokenizer teachers")
    teacher_quality_tau: float = setting(0.1, "per-domain teacher weight = registry weight x softmax(-held-out "
                                         "nats per char / tau); 0 = registry weights only")


@dataclass
class RouterSettings:
    epochs: int = setting(30, "passes over the router's training features")
    lr: float = setting(5e-3, "router head learning rate")
    max_samples: int = setting(400, "prompts per domain used to train the router")


@dataclass
class ThermalSettings:
    threshold_c: float = setting(83.0, "pause the GPU work above this temperature (deg C)")
    pause_s: float = setting(30.0, "length of a thermal pause, seconds")
    poll_s: float = setting(5.0, "seconds between temperature reads")
    hysteresis_c: float = setting(5.0, "resume only below threshold_c minus this")


@dataclass
class MemorySettings:
    budget: str = setting("", "memory budget such as 12GB (empty: free accelerator memory, or RAM on CPU)")
    sli_params_threshold: float = setting(60e9, "teachers with more parameters always use SLI")


@dataclass
class FaultSettings:
    oom_at_batches: str = setting("", "test hook: raise out-of-memory at these batch numbers (e.g. 3,7)")


# (section, key) of the settings that change how work is split or how much memory it takes, never results.
UNFINGERPRINTED = {("extract", "ranges"), ("extract", "logit_chunk"), ("distill", "nproc")}


@dataclass
class Settings:
    run: RunSettings = field(default_factory=RunSettings)
    extract: ExtractSettings = field(default_factory=ExtractSettings)
    profile: ProfileSettings = field(default_factory=ProfileSettings)
    student: StudentSettings = field(default_factory=StudentSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    router: RouterSettings = field(default_factory=RouterSettings)
    thermal: ThermalSettings = field(default_factory=ThermalSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    faults: FaultSettings = field(default_factory=FaultSettings)

    def __post_init__(self):
        if not 0.0 <= self.distill.alpha <= 1.0:
            raise ConfigError("--distill-alpha must be in [0, 1]")
        if self.distill.nproc < 1:
            raise ConfigError("--distill-nproc must be >= 1 (processes, one GPU each)")
        if self.distill.temperature <= 0:
            raise ConfigError("--distill-temperature must be > 0")
        if self.extract.top_k < 1 or self.extract.seq_len < 2:
            raise ConfigError("--extract-top-k must be >= 1 and --extract-seq-len >= 2")
        if not 0.0 < self.extract.heldout_fraction < 1.0:
            raise ConfigError("--extract-heldout-fraction must be in (0, 1)")
        if self.distill.xtok_loss not in ("hybrid", "shared", "uld"):
            raise ConfigError(f"--distill-xtok-loss must be hybrid, shared or uld, not {self.distill.xtok_loss!r}")
        if self.distill.xtok_align not in ("token", "boundary"):
            raise ConfigError(f"--distill-xtok-align must be token or boundary, not {self.distill.xtok_align!r}")
        if self.run.sli not in ("auto", "always", "never"):
            raise ConfigError(f"--sli must be auto, always or never, not {self.run.sli!r}")
        if self.memory.budget:
            parse_bytes(self.memory.budget)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        """to_dict() inverted (job payloads, checkpoints); unknown sections or keys are a ConfigError."""
        sections = _sections()
        unknown = sorted(set(d) - set(sections))
        if unknown:
            raise ConfigError(f"settings: unknown section(s) {', '.join(unknown)}")
        kwargs = {}
        for name, section in sections.items():
            types = _field_types(section)
            values = d.get(name) or {}
            bad = sorted(set(values) - set(types))
            if bad:
                raise ConfigError(f"settings: unknown key(s) {', '.join(bad)} in [{name}]")
            kwargs[name] = section(**{k: _convert(v, types[k], f"{name}.{k}") for k, v in values.items()})
        return cls(**kwargs)

    def fingerprint(self, *sections: str) -> str:
        """sha256 of the named sections (all when none): what a stage's output depends on.

        Settings that only split the work or bound memory (UNFINGERPRINTED) are left out: changing
        them gives the same outputs, so the jobs keep their ids and resume."""
        d = self.to_dict()
        picked = {s: {k: v for k, v in d[s].items() if (s, k) not in UNFINGERPRINTED} for s in (sections or d.keys())}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]

    def resolved_device(self) -> str:
        if self.run.device != "auto":
            return self.run.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


# CLI knobs DESIGN.md names without a section prefix.
SHORT_FLAGS = {"run.sli": "--sli", "run.device": "--device", "memory.budget": "--memory-budget",
               "run.datasets": "--datasets", "run.models": "--models"}

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ConfigError(f"--memory-budget {text!r}: use a size such as 12GB, 512MB or 16GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_count(text: str) -> float:
    """'671B' -> 671e9, '7.6M' -> 7.6e6 (parameter-count hints)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMBT]?)\s*", str(text).upper())
    if not m:
        raise ValueError(f"not a count: {text!r}")
    return float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[m.group(2)]


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory().__class__ for f in fields(Settings)}


def _convert(value, typ, where: str):
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int:
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if typ is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a valid {typ.__name__}") from None


def _field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _apply(values: dict[str, dict], overrides: dict[str, dict]) -> None:
    for section, kv in overrides.items():
        values.setdefault(section, {}).update(kv)


def _from_toml(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    sections = _sections()
    out: dict[str, dict] = {}
    for section, kv in data.items():
        if section not in sections or not isinstance(kv, dict):
            raise ConfigError(f"{path}: unknown section [{section}] (known: {', '.join(sections)})")
        types = _field_types(sections[section])
        for key, value in kv.items():
            if key not in types:
                raise ConfigError(f"{path}: unknown key {key!r} in [{section}] (known: {', '.join(types)})")
            out.setdefault(section, {})[key] = _convert(value, types[key], f"{path} [{section}] {key}")
    return out


def _from_env(environ) -> dict[str, dict]:
    sections = _sections()
    out: dict[str, dict] = {}
    # Variables that are not settings (NEXUS_HOME, NEXUS_GPU_SENSOR, ...) are ignored;
    # a variable naming a known section with an unknown key is an error.
    for name, value in environ.items():
        if not name.startswith("NEXUS_"):
            continue
        rest = name[len("NEXUS_"):].lower()
        for section, cls in sections.items():
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1:]
                types = _field_types(cls)
                if key not in types:
                    raise ConfigError(f"{name}: unknown setting {section}.{key} (known: {', '.join(types)})")
                out.setdefault(section, {})[key] = _convert(value, types[key], name)
                break
    return out


def _flag_type(typ):
    def convert(text):
        try:
            return _convert(text, typ, "flag")
        except ConfigError:  # argparse then exits 2 with "argument --x: invalid value"
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {typ.__name__}") from None

    return convert


def add_cli_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting (`--section-key`, or the short name DESIGN.md gives)."""
    for section, cls in _sections().items():
        types = _field_types(cls)
        group = parser.add_argument_group(f"[{section}] settings")
        for f in fields(cls):
            flag = SHORT_FLAGS.get(f"{section}.{f.name}", f"--{section}-{f.name.replace('_', '-')}")
            kwargs = dict(dest=f"cfg__{section}__{f.name}", default=None, metavar=f.name.upper(),
                          help=f"{f.metadata['help']} (default: {f.default!r})")
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            kwargs["type"] = _flag_type(types[f.name])
            group.add_argument(flag, **kwargs)


def _from_args(args: argparse.Namespace | None) -> dict[str, dict]:
    out: dict[str, dict] = {}
    if args is None:
        return out
    for name, value in vars(args).items():
        if name.startswith("cfg__") and value is not None:
            _, section, key = name.split("__", 2)
            out.setdefault(section, {})[key] = value
    return out


def load_settings(home: Path | None = None, args: argparse.Namespace | None = None,
                  environ=None, defaults: dict | None = None, **overrides: dict) -> Settings:
    """Resolve settings: built-ins < `defaults` (e.g. the demo's) < home/nexus.toml < NEXUS_* env
    < CLI args < overrides."""
    from nexus_core.paths import nexus_home

    home = Path(home) if home else nexus_home()
    values: dict[str, dict] = {}
    _apply(values, {k: dict(v) for k, v in (defaults or {}).items()})
    _apply(values, _from_toml(home / "nexus.toml"))
    _apply(values, _from_env(os.environ if environ is None else environ))
    _apply(values, _from_args(args))
    _apply(values, overrides)
    sections = _sections()
    kwargs = {}
    for section, cls in sections.items():
        types = _field_types(cls)
        kv = values.get(section, {})
        for key in kv:
            if key not in types:
                raise ConfigError(f"unknown setting {section}.{key}")
        kwargs[section] = cls(**{k: _convert(v, types[k], f"{section}.{k}") for k, v in kv.items()})
    return Settings(**kwargs)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string: JSON's escapes are TOML's


def to_toml(values: dict[str, dict], header: str = "") -> str:
    lines = [f"# {line}" for line in header.splitlines()]
    for section in sorted(values):
        if values[section]:
            lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in sorted(values[section].items())]
    return "\n".join(lines).lstrip("\n") + "\n"


def keep_settings(home: Path, args: argparse.Namespace | None = None, defaults: dict | None = None,
                  why: str = "") -> Path | None:
    """Write a run's own settings into home/nexus.toml, so that a later plain `nexus run` in this workdir
    resolves the same ones (and redoes nothing): `defaults` under the keys the file already has, the
    command-line flags over them. Environment variables are the caller's and stay out. Returns the
    file when it changed, None when it already said all of it."""
    path = home / "nexus.toml"
    current = _from_toml(path)
    values: dict[str, dict] = {}
    _apply(values, {k: dict(v) for k, v in (defaults or {}).items()})
    _apply(values, current)
    _apply(values, _from_args(args))
    if values == current:
        return None
    header = (f"Settings of this workdir ({why}; edit freely).\n" if why else "Settings of this workdir.\n") + \
        "Precedence: built-in defaults < this file < NEXUS_<SECTION>_<KEY> < command-line flags."
    text = to_toml(values, header)
    assert tomllib.loads(text) == values  # what we write reads back as the same settings
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
