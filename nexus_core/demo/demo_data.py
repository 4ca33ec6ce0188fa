"""The demo's datasets, generated on the spot (never copied or downloaded).

- `reasoning/arithmetic`: question/answer rows ("What is 37 + 45?" / "37 + 45 = 82"),
  mixed +, -, *, from a seeded RNG.
- `code/python-stdlib`: {"text": source} rows of .py files from the running interpreter's
  standard library, a deterministic subset capped by total bytes.

The teachers learn from a **pool** of their own (`teacher_pool`): more arithmetic rows from another
seed and other stdlib files, with every document of the datasets above left out. A
pretrained teacher knows more than the user's rows show and has not seen them (neither the rows the
student trains on nor the held-out ones it is scored on); a teacher trained on the user's rows
would hand the student memorised labels, and KD would have nothing to add to a plain fine-tune.
The pool is regenerated in memory from the spec; only the datasets are written.

Each folder gets one jsonl file written atomically and then a marker (`.demo-marker`,
no data suffix so `load_texts` never reads it) holding the hash of the generator's
parameters and the file's sha256. A folder whose marker matches is left alone.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

from nexus_core.paths import Paths
from nexus_core.storage.atomic import atomic_path, sha256_file, write_json

MARKER = ".demo-marker"
GENERATOR_VERSION = 1
ARITHMETIC = ("reasoning", "arithmetic")
STDLIB = ("code", "python-stdlib")
# Folders of the stdlib that are not ordinary library code (tests, vendored packages, demos).
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
              "turtledemo", "lib2to3", "ensurepip", "venv", "pydoc_data"}
_QUESTIONS = ("What is {q}?", "Compute {q}.", "Calculate {q}.", "What does {q} equal?")


@dataclass(frozen=True)
class DataSpec:
    arithmetic_rows: int = 4000
    stdlib_bytes: int = 1_500_000
    stdlib_max_file_bytes: int = 60_000  # skip giant files so the subset spans many modules
    seed: int = 1234
    # The teachers' pool (module docstring): disjoint from the datasets, several times their size.
    pool_arithmetic_rows: int = 40_000
    pool_stdlib_bytes: int = 3_000_000

    def pool_fp(self) -> str:
        return _fp({"v": GENERATOR_VERSION, "arith": self.pool_arithmetic_rows, "bytes": self.pool_stdlib_bytes,
                    "user": [self.arithmetic_fp(), self.stdlib_fp()]})

    def arithmetic_fp(self) -> str:
        return _fp({"v": GENERATOR_VERSION, "rows": self.arithmetic_rows, "seed": self.seed})

    def stdlib_fp(self) -> str:
        # The content depends on the interpreter, so its version is part of the identity.
        return _fp({"v": GENERATOR_VERSION, "bytes": self.stdlib_bytes, "max_file": self.stdlib_max_file_bytes,
                    "python": sys.version, "skip": sorted(_SKIP_DIRS)})


def _fp(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# --- generators ------------------------------------------------------------------------

def arithmetic_rows(n: int, seed: int) -> list[dict]:
    """n question/answer rows; the same (n, seed) always gives the same rows."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(2, 99), rng.randint(2, 12)
        else:
            a, b = rng.randint(1, 999), rng.randint(1, 999)
        if op == "-" and b > a and rng.random() < 0.7:  # mostly non-negative results
            a, b = b, a
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        q = f"{a} {op} {b}"
        rows.append({"question": rng.choice(_QUESTIONS).format(q=q), "answer": f"{q} = {result}"})
    return rows


def stdlib_files(cap_bytes: int, max_file_bytes: int, root: Path | None = None,
                 exclude: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """(relative path, source) of stdlib .py files, a deterministic subset of at most cap_bytes.

    Files are taken in the order of sha256(relative path), which spreads the subset over
    many modules instead of the alphabet's first letters, and returned sorted by path.
    A file whose text is in `exclude` is skipped (the teachers' pool leaves out the dataset's files).
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    candidates = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]) or not p.is_file():
            continue
        size = p.stat().st_size
        if 200 <= size <= max_file_bytes:
            candidates.append((hashlib.sha256(rel.as_posix().encode()).hexdigest(), rel.as_posix(), p))
    picked, total = [], 0
    for _, rel, p in sorted(candidates):
        try:
            text = p.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if "\x00" in text or not text.strip() or text in exclude:
            continue
        size = len(text.encode("utf-8"))
        if total + size > cap_bytes:
            continue  # a smaller file later may still fit
        picked.append((rel, text))
        total += size
    return sorted(picked)


def teacher_pool(spec: DataSpec, datasets: dict[str, list[str]]) -> dict[str, list[str]]:
    """The teachers' training documents per dataset name, none of them in `datasets` (module docstring).

    Arithmetic: rows of another seed, less any document of the dataset (a times-table fact may recur in
    another phrasing, as it would in any pretraining corpus); code: the next stdlib files in hash order.
    """
    arith_name, code_name = "/".join(ARITHMETIC), "/".join(STDLIB)
    seen = frozenset(datasets[arith_name])
    arith = [t for t in (f"{r['question']}\n{r['answer']}"
                         for r in arithmetic_rows(spec.pool_arithmetic_rows, spec.seed + 1)) if t not in seen]
    code = [t for _, t in stdlib_files(spec.pool_stdlib_bytes, spec.stdlib_max_file_bytes,
                                       exclude=frozenset(datasets[code_name]))]
    return {arith_name: arith, code_name: code}


# --- writing -------------------------------------------------------------------------

def _write_jsonl(target: Path, rows: list[dict]) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def _is_complete(folder: Path, fp: str) -> bool:
    marker = folder / MARKER
    try:
        m = json.loads(marker.read_text())
        return m.get("fp") == fp and sha256_file(folder / m["file"]) == m["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _ensure(folder: Path, fname: str, fp: str, make_rows, params: dict) -> tuple[bool, int]:
    """Write folder/fname + marker unless complete; returns (generated, rows)."""
    if _is_complete(folder, fp):
        return False, json.loads((folder / MARKER).read_text())["rows"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).unlink(missing_ok=True)  # a stale marker must never vouch for new data
    rows = make_rows()
    _write_jsonl(folder / fname, rows)
    write_json(folder / MARKER, {"fp": fp, "file": fname, "rows": len(rows),
                                 "sha256": sha256_file(folder / fname), "params": params})
    return True, len(rows)


def ensure_datasets(paths: Paths, spec: DataSpec = DataSpec()) -> list[dict]:
    """Generate both demo datasets unless already complete; one summary dict per dataset."""
    out = []
    folder = paths.dataset_dir(*ARITHMETIC)
    made, n = _ensure(folder, "arithmetic.jsonl", spec.arithmetic_fp(),
                      lambda: arithmetic_rows(spec.arithmetic_rows, spec.seed), asdict(spec))
    out.append({"dataset": "/".join(ARITHMETIC), "path": str(folder), "rows": n, "generated": made})

    folder = paths.dataset_dir(*STDLIB)
    made, n = _ensure(folder, "stdlib.jsonl", spec.stdlib_fp(),
                      lambda: [{"text": t} for _, t in stdlib_files(spec.stdlib_bytes, spec.stdlib_max_file_bytes)],
                      {**asdict(spec), "python": sys.version})
    out.append({"dataset": "/".join(STDLIB), "path": str(folder), "rows": n, "generated": made})
    return out


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def dataset_texts(paths: Paths) -> dict[str, list[str]]:
    """The demo datasets' documents, as `load_texts` would render them (question\\nanswer, text)."""
    arith = read_jsonl(paths.dataset_dir(*ARITHMETIC) / "arithmetic.jsonl")
    code = read_jsonl(paths.dataset_dir(*STDLIB) / "stdlib.jsonl")
    return {"/".join(ARITHMETIC): [f"{r['question']}\n{r['answer']}" for r in arith],
            "/".join(STDLIB): [r["text"] for r in code]}
