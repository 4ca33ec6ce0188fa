"""Two teachers with different tokenizers (byte-level BPE and unigram) through the real CLI.

The student inherits the primary's BPE tokenizer; the unigram teacher's shards are aligned onto
the student's rows by character spans, and its ids onto the student's by token text.
"""

from __future__ import annotations

import json

import pytest

from nexus_core.records.events import read_events
from tests.helpers import ARITH, CODE, nexus, of_type, register


@pytest.fixture(scope="session")
def unigram_teacher_dir(tmp_path_factory):
    from nexus_core.demo.model_factory import make_teacher, train_tokenizer

    out = tmp_path_factory.mktemp("teachers") / "tiny-unigram"
    tok = train_tokenizer(ARITH + CODE, 200, "unigram")
    make_teacher(out, ARITH + CODE, arch="mistral", tokenizer=tok, hidden=48, layers=2, heads=4, kv_heads=2, seed=3)
    return out


def test_pipeline_runs_with_two_teachers_of_different_tokenizers(demo_workdir, unigram_teacher_dir, redis_conn,
                                                                 redis_url):
    paths = demo_workdir
    body = json.loads((paths.registry / "tiny.json").read_text())
    (paths.registry / "tiny.json").write_text(json.dumps({**body, "primary": True}))
    register(paths, "uni", unigram_teacher_dir, weight=0.5)
    run = nexus(paths, "run", redis_url=redis_url)
    assert run.returncode == 0, run.stderr[-3000:]
    events = read_events(paths.log)
    assert len(of_type(events, "StageCompleted", "extract")) == 4  # 2 teachers x 2 datasets
    for tid in ("tiny", "uni"):
        m = json.loads((paths.memory / tid / "code__snippets" / "manifest.json").read_text())
        assert m["offsets"] and m["heldout_quality"]["loss_per_char"] > 0
    text_fps = {json.loads((paths.memory / t / "reasoning__arith" / "manifest.json").read_text())["text_fp"]
                for t in ("tiny", "uni")}
    assert len(text_fps) == 1  # both teachers saw the same training text coordinate
    done = of_type(events, "StageCompleted", "distill")
    assert len(done) == 1
    usage = done[0].data["teacher_usage"]
    assert set(usage) == {"tiny", "uni"}
    assert usage["tiny"]["tokenizer"] == "primary" and usage["uni"]["tokenizer"] == "aligned"
    for d in ("reasoning/arith", "code/snippets"):
        uni = usage["uni"]["domains"][d]
        assert uni["used"] and uni["aligned_positions_pct"] > 20, uni  # next tokens with the same text
        assert 0 < uni["shared_token_coverage_pct"] <= 100
        tiny = usage["tiny"]["domains"][d]
        # per-domain weights follow held-out quality (nats per character, comparable across tokenizers)
        better, worse = sorted((tiny, uni), key=lambda u: u["heldout_loss_per_char"])
        assert better["weight"] >= worse["weight"] >= 0 and better["weight"] > 0
    noted = [e for e in of_type(events, "StageProgress", "distill") if e.data.get("note") == "TeacherSignalsAligned"]
    assert noted and set(noted[0].data["teacher_usage"]) == {"tiny", "uni"}
    assert (paths.release / "config.json").exists()
    # Every teacher is evaluated, the other tokenizer on the same held-out texts packed with its own; the
    # report compares them with the student per character.
    ev = json.loads((paths.results / "eval.json").read_text())["datasets"]
    report = json.loads((paths.results / "report.json").read_text())["domains"]
    for d in ("reasoning/arith", "code/snippets"):
        tiny, uni = ev[d]["teachers"]["tiny"], ev[d]["teachers"]["uni"]
        assert tiny["tokenizer"] == "primary" and uni["tokenizer"] == "own", ev[d]
        assert uni["loss_per_char"] > 0 and ev[d]["student"]["loss_per_char"] > 0
        assert report[d]["unit"] == "nats/char" and set(report[d]["teachers"]) == {"tiny", "uni"}
        assert report[d]["teachers"]["uni"] == uni["loss_per_char"]
