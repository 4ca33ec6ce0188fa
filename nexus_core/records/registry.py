"""Teacher JSON files: parse, validate against DESIGN.md's schema, and describe teachers.

Parsing never raises for one bad teacher in a list: it returns the good ones and one
rejection (file, field, what to do) per bad one, so every other teacher carries on.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nexus_core.errors import RegistryError
from nexus_core.paths import TEACHER_ID_RE

MAX_FILE_BYTES = 1 << 20  # a registry file is a few hundred bytes; 1 MiB is already absurd
ROSTER_NAME = "registry.json"
KNOWN_FIELDS = {"teacher_id", "path", "status", "params", "trust_remote_code", "datasets",
                "weight", "primary", "sli", "description"}


@dataclass(frozen=True)
class Teacher:
    teacher_id: str
    path: str  # absolute, resolved: a model folder, or a .gguf file
    status: str
    source: str  # registry file it came from (relative to NEXUS_HOME when inside it)
    params: str | None = None
    trust_remote_code: bool = False
    datasets: tuple[str, ...] | None = None
    weight: float = 1.0
    primary: bool = False
    sli: str | None = None  # per-teacher override of --sli (auto|always|never)
    description: str = ""
    weight_files: tuple[tuple[str, int], ...] = field(default=(), compare=False)

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["datasets"] = list(self.datasets) if self.datasets is not None else None
        d["weight_files"] = [list(w) for w in self.weight_files]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Teacher":
        d = dict(d)
        d["datasets"] = tuple(d["datasets"]) if d.get("datasets") is not None else None
        d["weight_files"] = tuple(tuple(w) for w in d.get("weight_files", ()))
        return cls(**d)

    def fingerprint(self) -> str:
        """Identity of the teacher's inputs: its JSON fields and its weight files' names and sizes."""
        d = self.to_dict()
        d.pop("source", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _weight_files(model_dir: Path) -> tuple[tuple[str, int], ...]:
    if model_dir.is_file():  # a GGUF teacher: the one file is its weights
        return ((model_dir.name, model_dir.stat().st_size),)
    return tuple(sorted((p.name, p.stat().st_size) for p in model_dir.glob("*.safetensors")))


GGUF_MAGIC = b"GGUF"
_GGUF_SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$")


def gguf_file(path: Path, where: str = "") -> Path | None:
    """The .gguf file a teacher `path` names: the file itself, or the one .gguf in a folder that has no
    *.safetensors (a Hugging Face folder wins). None when `path` is not a GGUF teacher; RegistryError
    when it names a file that is not a GGUF, a split GGUF, or a folder with several .gguf files."""
    path = Path(path)
    if path.is_dir():
        if any(path.glob("*.safetensors")):
            return None
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            names = ", ".join(p.name for p in found[:4]) + (" …" if len(found) > 4 else "")
            split = " (a split GGUF: merge the parts with llama-gguf-split --merge)" if all(
                _GGUF_SPLIT.search(p.name) for p in found) else ""
            raise RegistryError(where, f"field 'path': {path} holds {len(found)} .gguf files ({names}){split}; "
                                       "point 'path' at the one file to use")
        if not found:
            return None
        path = found[0]
    elif not (path.is_file() and path.suffix.lower() == ".gguf"):
        return None
    if _GGUF_SPLIT.search(path.name):
        raise RegistryError(where, f"field 'path': {path} is one part of a split GGUF; merge the parts into one "
                                   "file with llama-gguf-split --merge and point 'path' at it")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head != GGUF_MAGIC:
        raise RegistryError(where, f"field 'path': {path} is not a GGUF file (it does not start with 'GGUF'); "
                                   "re-download it or point 'path' at a Hugging Face model folder")
    return path


def check_model_dir(model_dir: Path, where: str) -> None:
    """Cheap checks of a model folder (or GGUF file); loading problems surface later in the profile stage."""
    if not model_dir.exists():
        raise RegistryError(where, f"field 'path': {model_dir} does not exist; fix the path or create the model folder")
    if gguf_file(model_dir, where) is not None:
        return
    if not model_dir.is_dir():
        raise RegistryError(where, f"field 'path': {model_dir} is not a folder or a .gguf file; point it at a "
                                   "Hugging Face model folder or a GGUF file")
    if not (model_dir / "config.json").is_file():
        raise RegistryError(where, f"field 'path': {model_dir} has no config.json; it is not a Hugging Face model folder")
    if not any(model_dir.glob("*.safetensors")):
        if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")) or any(model_dir.glob("*.pth")):
            raise RegistryError(where, f"field 'path': {model_dir} has only pickle weights (.bin/.pt), which Nexus never loads; convert them to safetensors")
        raise RegistryError(where, f"field 'path': {model_dir} has no *.safetensors weights")
    if not ((model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file()):
        raise RegistryError(where, f"field 'path': {model_dir} has no tokenizer files (tokenizer.json / tokenizer_config.json)")


def parse_teacher(obj, source: str, home: Path) -> Teacher:
    """Validate one teacher object; raise RegistryError naming the file and the field."""
    if not isinstance(obj, dict):
        raise RegistryError(source, f"each teacher must be a JSON object, got {type(obj).__name__}")
    tid = obj.get("teacher_id")
    where = source if not isinstance(tid, str) else f"{source} [{tid[:64]!r}]"
    unknown = sorted(set(obj) - KNOWN_FIELDS)
    if unknown:
        raise RegistryError(where, f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(KNOWN_FIELDS))}",
                            tid if isinstance(tid, str) else None)
    for required in ("teacher_id", "path", "status"):
        if required not in obj:
            raise RegistryError(where, f"field {required!r} is required")
    if not isinstance(tid, str) or not TEACHER_ID_RE.fullmatch(tid):
        raise RegistryError(where, "field 'teacher_id' must match [A-Za-z0-9][A-Za-z0-9._-]{0,63} (it is used in paths)")

    def typed(name, types, what):
        value = obj.get(name)
        if value is not None and not isinstance(value, types) or isinstance(value, bool) and bool not in types:
            raise RegistryError(where, f"field {name!r} must be {what}, got {json.dumps(value)[:40]}", tid)
        return value

    path = typed("path", (str,), "a string (a model folder)")
    status = typed("status", (str,), 'a string ("ready" to process)')
    params = typed("params", (str, int, float), 'a string such as "7B" or a number')
    trust = typed("trust_remote_code", (bool,), "true or false") or False
    datasets = typed("datasets", (list,), 'a list of "category/name" strings')
    if datasets is not None:
        for d in datasets:
            if not isinstance(d, str) or d.count("/") != 1 or any(not TEACHER_ID_RE.fullmatch(p) for p in d.split("/")):
                raise RegistryError(where, f"field 'datasets': {json.dumps(d)[:40]} is not a category/name pair", tid)
        datasets = tuple(datasets)
    weight = typed("weight", (int, float), "a positive number")
    weight = 1.0 if weight is None else float(weight)
    if not weight > 0:
        raise RegistryError(where, "field 'weight' must be > 0", tid)
    primary = typed("primary", (bool,), "true or false") or False
    sli = typed("sli", (str,), '"auto", "always" or "never"')
    if sli is not None and sli not in ("auto", "always", "never"):
        raise RegistryError(where, 'field \'sli\' must be "auto", "always" or "never"', tid)
    description = typed("description", (str,), "a string") or ""

    model_dir = Path(path).expanduser()
    if not model_dir.is_absolute():
        model_dir = home / model_dir
    model_dir = model_dir.resolve()
    weight_files: tuple = ()
    if status == "ready":
        try:
            check_model_dir(model_dir, where)
            model_dir = gguf_file(model_dir, where) or model_dir  # a GGUF folder's teacher is its one file
        except RegistryError as exc:
            raise RegistryError(where, exc.reason, tid) from None
        weight_files = _weight_files(model_dir)
    return Teacher(teacher_id=tid, path=str(model_dir), status=status, source=source,
                   params=None if params is None else str(params), trust_remote_code=trust,
                   datasets=datasets, weight=weight, primary=primary, sli=sli,
                   description=description, weight_files=weight_files)


def source_name(file: Path, home: Path) -> str:
    try:
        return str(file.resolve().relative_to(home.resolve()))
    except ValueError:
        return str(file)


def parse_registry_file(file: Path, home: Path) -> tuple[list[Teacher], list[RegistryError]]:
    """Parse one registry file: a teacher object, a list of them, or a roster {"teachers": [...]}.

    Returns (teachers, rejections). A file-level problem is a single rejection with no teachers.
    """
    source = source_name(file, home)
    try:
        size = file.stat().st_size
        if size > MAX_FILE_BYTES:
            return [], [RegistryError(source, f"file is {size} bytes; a registry file must be under {MAX_FILE_BYTES} bytes")]
        raw = file.read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        return [], [RegistryError(source, "file vanished while being read")]
    except UnicodeDecodeError:
        return [], [RegistryError(source, "file is not UTF-8 text; save it as UTF-8 JSON")]
    except OSError as exc:
        return [], [RegistryError(source, f"cannot read file ({exc.strerror})")]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return [], [RegistryError(source, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); fix the syntax")]
    except RecursionError:
        return [], [RegistryError(source, "JSON is nested too deeply; a teacher is a flat object")]
    if isinstance(data, dict) and "teachers" in data and "teacher_id" not in data:
        data = data["teachers"]
    items = data if isinstance(data, list) else [data]
    if not items:
        return [], [RegistryError(source, "no teachers in file (empty list)")]
    teachers: list[Teacher] = []
    rejections: list[RegistryError] = []
    seen: set[str] = set()
    for obj in items:
        try:
            t = parse_teacher(obj, source, home)
        except RegistryError as exc:
            rejections.append(exc)
            continue
        except RecursionError:
            rejections.append(RegistryError(source, "JSON is nested too deeply; a teacher is a flat object"))
            continue
        if t.teacher_id in seen:
            rejections.append(RegistryError(source, f"field 'teacher_id': duplicate {t.teacher_id!r} in this file", t.teacher_id))
            continue
        seen.add(t.teacher_id)
        teachers.append(t)
    return teachers, rejections


def registry_files(registry_dir: Path) -> list[Path]:
    """Every *.json in registry/ (sorted: the order decides duplicate ids deterministically)."""
    if not registry_dir.exists():
        return []
    return sorted(p for p in registry_dir.glob("*.json") if p.is_file() and not p.name.startswith("."))
