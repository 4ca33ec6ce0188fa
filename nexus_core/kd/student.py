"""The student: an ordinary transformers causal LM, by default the primary teacher depth-pruned.

Depth pruning keeps the layers the profile ranks most important (block influence), in
their original order, and copies embeddings, norms and head, so the student starts from
the teacher's knowledge. Weights are read tensor by tensor from the teacher's safetensors
files, so the teacher itself is never loaded whole. With `--student-params` the kept layers are
then width-pruned to the size asked for (kd/width.py); when the depth is not set as well, a few
depths are tried and the one whose pruned student is closest to the data wins (kd/depth_search.py).
When the pruned student would not fit the memory budget, it is built from `cfg.student.config`
(an HF config) instead.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
from safetensors import safe_open

from nexus_core.config import Settings, parse_bytes
from nexus_core.data import DatasetRef
from nexus_core.errors import BadInputError
from nexus_core.kd import dense_student, depth_search, width
from nexus_core.paths import Paths
from nexus_core.records.plan import DistillPlan
from nexus_core.teachers.loading import load_config, load_model
from nexus_core.teachers.text_models import NO_STUDENT
from nexus_core.teachers.weights import open_weights

log = structlog.get_logger("nexus.distill")
_LAYER_RE = re.compile(r"(^|\.)(layers|h)\.(\d+)\.")
TRAIN_BYTES_PER_PARAM = 16  # fp32 weights + grads + AdamW's two moments
ACTIVATION_MARGIN = 1.25
AUTO_LAYER_RATIO = 0.5  # the share of layers kept when the depth is left to Nexus and not searched for


def memory_budget(cfg: Settings, device: str) -> int:
    if cfg.memory.budget:
        return parse_bytes(cfg.memory.budget)
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def count_params(config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def keep_count(cfg: Settings, n_layers: int) -> int:
    ratio = cfg.student.layer_ratio if cfg.student.layer_ratio > 0 else AUTO_LAYER_RATIO
    n = cfg.student.layers if cfg.student.layers > 0 else round(n_layers * ratio)
    return max(1, min(n_layers, n))


def pick_layers(importance: list[float] | None, n_layers: int, n_keep: int) -> list[int]:
    """The n_keep most important layers, in model order; evenly spaced when there is no profile."""
    if not importance or len(importance) != n_layers:
        return sorted({round(i * (n_layers - 1) / max(n_keep - 1, 1)) for i in range(n_keep)})
    ranked = sorted(range(n_layers), key=lambda i: (-importance[i], i))
    return sorted(ranked[:n_keep])


def pruned_config(teacher_config, kept: list[int]):
    cfg = copy.deepcopy(teacher_config)
    if hasattr(cfg, "quantization_config"):  # the student trains and ships in full precision (FP8/MXFP4 teachers)
        del cfg.quantization_config
    per_layer = getattr(cfg, "layer_types", None)
    cfg.num_hidden_layers = len(kept)
    if isinstance(per_layer, list) and len(per_layer) == teacher_config.num_hidden_layers:
        cfg.layer_types = [per_layer[i] for i in kept]
    return cfg


def config_from_json(text: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(**json.loads(text))


def model_from_config(config):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    return model.to(torch.float32)


def _teacher_key(student_key: str, kept: list[int]) -> str:
    return _LAYER_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}.{kept[int(m.group(3))]}.", student_key, count=1)


def _copy_from_weights(model, teacher_dir: Path, kept: list[int]) -> list[str]:
    """Fill the student's tensors from the teacher's weights, tensor by tensor; returns the keys not found."""
    store = open_weights(teacher_dir)
    state = model.state_dict()
    wanted = {_teacher_key(k, kept): k for k in state}
    found = set()
    with store.reading() as read:
        for name in sorted(store.meta.tensors):
            if name in wanted and tuple(state[wanted[name]].shape) == tuple(store.meta.tensors[name].shape):
                with torch.no_grad():
                    state[wanted[name]].copy_(read(name).to(torch.float32))
                found.add(wanted[name])
    # A tied head shares the embedding's storage: filled with it, though the teacher stores no lm_head
    # (SmolLM2, Llama 3.2 and most GGUF files); counting it missing would load the whole teacher instead.
    filled = {state[k].data_ptr() for k in found}
    return sorted(k for k in set(state) - found if state[k].data_ptr() not in filled)


def _copy_from_model(model, teacher_dir: Path, kept: list[int], trust_remote_code: bool) -> None:
    """Fallback when file keys differ from module keys (e.g. converted checkpoints): load the teacher."""
    from nexus_core.records.registry import Teacher

    teacher = load_model(Teacher(teacher_dir.name, str(teacher_dir), "ready", "", trust_remote_code=trust_remote_code),
                         torch.float32)
    t_state = teacher.state_dict()
    sd = {k: t_state[_teacher_key(k, kept)] for k in model.state_dict()}
    model.load_state_dict(sd, strict=True)


def build_student(cfg: Settings, plan: DistillPlan, paths: Paths, device: str, profile: dict):
    """A fresh student for the plan. Returns (model, info) with info = {source, kept_layers, params} (+ width
    when --student-params narrowed it, + depth_search when the depth was searched for)."""
    teacher = plan.primary_teacher
    t_config = load_config(teacher)  # config.json, or a GGUF file's metadata
    why_not = NO_STUDENT.get(t_config.get_text_config().model_type)
    if why_not and not cfg.student.config:
        raise BadInputError(f"teacher {teacher.teacher_id!r} cannot be the primary teacher: {why_not}; make another "
                            f"teacher primary (\"primary\": true in its registry JSON) or set --student-config to an "
                            f"HF config.json for the student")
    L = t_config.get_text_config().num_hidden_layers
    # Loaded once: they rank the channels width pruning keeps and score the depths the search tries.
    rows, mask = calibration_rows(plan, paths, max(cfg.profile.calibration_samples, 1)) if cfg.student.params \
        else (None, None)
    budget = memory_budget(cfg, device)

    def build(n_keep: int):
        """The student keeping n_keep layers; BadInputError when it cannot reach the target or fit the budget."""
        kept = pick_layers(profile.get("layer_importance"), L, n_keep)
        sized = _sized(cfg, t_config, kept)
        # A deep candidate's seed (its layers at the teacher's full width, beside the narrowed copy) can outweigh
        # training the student when the target is a small share of the teacher.
        if max(sized.need, sized.build_bytes) > budget:
            raise BadInputError(f"{sized.params:,} parameters (~{sized.need / 1e9:.1f} GB to train, "
                                f"~{sized.build_bytes / 1e9:.1f} GB to build) exceed the memory budget "
                                f"({budget / 1e9:.1f} GB)")
        return _build(cfg, plan, t_config, kept, sized, profile, rows, mask)

    skipped = _search_skipped(cfg, t_config, L, rows)
    if skipped is None:
        found = depth_search.search(L, build, rows, mask, _ranked_on(plan, rows))
        if found is not None:
            return found
        skipped = "no depth could be built (log: distill.student_search)"  # the path below says why, or falls back
    kept = pick_layers(profile.get("layer_importance"), L, keep_count(cfg, L))
    sized = _sized(cfg, t_config, kept)
    if sized.need <= budget:
        model, info = _build(cfg, plan, t_config, kept, sized, profile, rows, mask)
        return model, ({**info, "depth_search": {"skipped": skipped}} if skipped else info)
    return _from_config(cfg, teacher.teacher_id, t_config, sized, budget)


def depth_is_auto(cfg: Settings) -> bool:
    """Neither --student-layers nor --student-layer-ratio set: the depth is Nexus's to choose."""
    return cfg.student.layers <= 0 and cfg.student.layer_ratio <= 0


def _search_skipped(cfg: Settings, t_config, L: int, rows) -> str | None:
    """None when the depth is searched for; else why not ("" when no search was asked for)."""
    if not (cfg.student.params and depth_is_auto(cfg)):
        return ""  # the user fixed the depth, or asked for no size
    seed_config = _student_config(t_config, list(range(L)))
    if not width.supports(seed_config):
        return ""  # today's path, which says width pruning does not support it
    if rows is None:
        return f"no calibration rows (no shards yet) to score the depths on: kept {AUTO_LAYER_RATIO:.0%} of the layers"
    return None


@dataclass(frozen=True)
class _Sized:
    """A depth-pruned student config and the widths --student-params asks of it."""
    config: object      # the seed's HF config: kept layers at the teacher's full width
    moe: bool           # seeded from a MoE teacher's experts (kd/dense_student.py)
    seed_params: int
    shape: width.Shape | None  # None: no width pruning
    target: int | None
    params: int         # after width pruning

    @property
    def need(self) -> int:
        """Bytes to train it."""
        return int(self.params * TRAIN_BYTES_PER_PARAM * ACTIVATION_MARGIN)

    @property
    def build_bytes(self) -> int:
        """Bytes to build it: the fp32 seed and its narrowed copy."""
        return (self.seed_params + self.params) * 4


def _student_config(t_config, kept: list[int]):
    moe = dense_student.is_moe(t_config)  # a MoE teacher seeds its dense sibling
    return dense_student.dense_config(t_config, kept) if moe else pruned_config(t_config, kept)


def _sized(cfg: Settings, t_config, kept: list[int]) -> _Sized:
    s_config = _student_config(t_config, kept)
    seed_params = count_params(s_config)
    shape, target = _width_target(cfg, t_config, s_config, seed_params)
    params = count_params(width.shaped_config(s_config, shape)) if shape else seed_params
    return _Sized(s_config, dense_student.is_moe(t_config), seed_params, shape, target, params)


def _build(cfg: Settings, plan: DistillPlan, t_config, kept: list[int], sized: _Sized, profile: dict, rows, mask):
    teacher = plan.primary_teacher
    torch.manual_seed(cfg.run.seed)
    model = model_from_config(sized.config)  # the seed: kept layers at the teacher's full width
    L = t_config.get_text_config().num_hidden_layers
    if sized.moe:
        info = _seed_dense(model, teacher, t_config, kept, profile, sized.seed_params)
    else:
        info = _seed_pruned(model, teacher, kept, L, profile, sized.seed_params)
    if sized.shape:
        model, info = _narrow(model, info, sized.shape, sized.target, rows, mask, _ranked_on(plan, rows))
    return model, info


def _from_config(cfg: Settings, teacher_id: str, t_config, sized: _Sized, budget: int):
    """The student built from --student-config, when the pruned one does not fit the memory budget."""
    from transformers import AutoConfig

    if not cfg.student.config:
        raise BadInputError(
            f"the {'width' if sized.shape else 'depth'}-pruned student ({sized.params:,} parameters, "
            f"~{sized.need / 1e9:.1f} GB to train) does not fit the memory budget ({budget / 1e9:.1f} GB): set "
            f"--student-layers lower, or --student-config to an HF config.json for a smaller student built from "
            f"scratch")
    path = Path(cfg.student.config).expanduser()
    try:
        s_config = config_from_json(path.read_text()) if path.is_file() else AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise BadInputError(f"--student-config {path}: cannot read it as an HF config ({exc})") from None
    # The student predicts the primary teacher's token ids, so it takes the teacher's vocabulary.
    for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(s_config, key, getattr(t_config, key, None))
    torch.manual_seed(cfg.run.seed)
    model = model_from_config(s_config)
    params = sum(p.numel() for p in model.parameters())
    log.warning("distill.student", source="config", config=str(path), params=params,
                reason=f"the depth-pruned student (~{sized.need / 1e9:.1f} GB to train) exceeds the memory budget "
                       f"({budget / 1e9:.1f} GB); built from --student-config with {teacher_id}'s tokenizer")
    L = t_config.get_text_config().num_hidden_layers
    return model, {"source": "config", "kept_layers": [], "teacher_layers": L, "params": params}


def _seed_pruned(model, teacher, kept: list[int], L: int, profile: dict, params: int) -> dict:
    """Copy the kept layers, embeddings, norms and head from the teacher's weights."""
    missing = _copy_from_weights(model, Path(teacher.path), kept)
    if missing:
        _copy_from_model(model, Path(teacher.path), kept, teacher.trust_remote_code)
    log.info("distill.student", source="depth-pruned", teacher=teacher.teacher_id, kept_layers=kept,
             teacher_layers=L, params=params, importance="profile" if profile else "evenly spaced (no profile)")
    return {"source": "pruned", "kept_layers": kept, "teacher_layers": L, "params": params}


def _width_target(cfg: Settings, t_config, s_config, seed_params: int) -> tuple[width.Shape | None, int | None]:
    """The widths --student-params asks for (None: no width pruning, the depth-pruned seed as is)."""
    if not cfg.student.params:
        return None, None
    target = width.target_params(cfg.student.params, count_params(t_config))
    if not width.supports(s_config):
        raise BadInputError(f"--student-params: width pruning supports llama-style students (llama, mistral, "
                            f"qwen2, qwen3), not {s_config.model_type}; leave it empty to depth-prune only")
    shape = width.choose_shape(s_config, target, count_params)
    if shape == width.teacher_shape(s_config):
        log.warning("distill.student_width", target=target, params=seed_params,
                    note="the depth-pruned student is already at or under --student-params; raise "
                         "--student-layer-ratio (or leave it and --student-layers unset, so that deeper students "
                         "are tried) to spend the rest of the budget on layers")
        return None, target
    return shape, target


def calibration_rows(plan: DistillPlan, paths: Paths, n: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Up to n packed rows (input_ids, attention_mask) from the primary teacher's shards, spread over its datasets."""
    teacher = plan.primary_teacher
    datasets = plan.teacher_datasets(teacher)
    per = -(-n // max(len(datasets), 1))
    ids, masks = [], []
    for d in datasets:
        folder = paths.shard_dir(teacher.teacher_id, DatasetRef.parse(d).slug)
        taken = 0
        for f in sorted(folder.glob("shard-*.safetensors")):
            if taken >= per:
                break
            with safe_open(str(f), "pt") as h:
                ids.append(h.get_tensor("input_ids")[:per - taken].long())
                masks.append(h.get_tensor("attention_mask")[:per - taken].long())
            taken += ids[-1].shape[0]
    if not ids:
        return None, None
    return torch.cat(ids)[:n], torch.cat(masks)[:n]


def _ranked_on(plan: DistillPlan, rows) -> str:
    return f"{rows.shape[0]} calibration rows of {plan.primary}'s shards" if rows is not None else \
        "nothing (no shards yet: the first channels kept)"


def _narrow(seed, info: dict, shape, target: int, rows, mask, ranked_on: str):
    """Width-prune the seed to `shape`, keeping the channels that are busiest on calibration rows."""
    imp = width.measure(seed.eval(), rows, mask)
    model, _kept = width.narrow(seed, shape, imp)
    params = sum(p.numel() for p in model.parameters())
    shape_d = {"layers": model.config.num_hidden_layers, "hidden": shape.hidden,
               "intermediate": shape.intermediate, "heads": model.config.num_attention_heads,
               "kv_heads": shape.kv_groups}
    log.info("distill.student_width", target=target, params=params, shape=shape_d, ranked_on=ranked_on)
    return model, {**info, "source": f"{info['source']}, width-pruned", "params": params,
                   "width": {"target": target, **shape_d, "ranked_on": ranked_on}}


def _seed_dense(model, teacher, t_config, kept: list[int], profile: dict, params: int) -> dict:
    """Copy the kept layers' attention/norms by name and fill their MLPs from the busiest experts."""
    missing = _copy_from_weights(model, Path(teacher.path), kept)
    used = dense_student.seed_mlps(model, open_weights(teacher.path), kept, t_config, profile.get("expert_load") or {})
    dense_student.check_complete(missing, used, teacher.teacher_id)
    L = t_config.get_text_config().num_hidden_layers
    log.info("distill.student", source="dense from MoE", teacher=teacher.teacher_id, kept_layers=kept,
             teacher_layers=L, params=params, architecture=model.config.model_type,
             experts={j: u["experts"] for j, u in used.items()})
    return {"source": f"pruned, dense {model.config.model_type} seeded from the most-used experts",
            "kept_layers": kept, "teacher_layers": L, "params": params,
            "mlp_from_experts": {str(j): u for j, u in used.items()}}


def student_layer_for(teacher_layer: int, kept: list[int], n_student: int, n_teacher: int) -> int:
    """Which student layer stands for a teacher layer in the hidden-state loss."""
    if kept:
        below = [i for i, k in enumerate(kept) if k <= teacher_layer]
        return below[-1] if below else 0
    return min(n_student - 1, teacher_layer * n_student // n_teacher)
