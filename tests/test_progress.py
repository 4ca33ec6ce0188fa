"""Progress lines: done/total, loss, tokens/s and ETA; throttled when not on a terminal."""

import io

from nexus_core import progress


def test_plain_lines_say_steps_loss_rate_and_eta():
    out = io.StringIO()
    with progress.Bar("distill", total=10, done=2, unit="steps", stream=out, every_s=0) as bar:
        bar.update(3, tokens=100, loss=2.5)
        assert "distill: 3/10 steps (30%) loss 2.5000" in out.getvalue()
        assert "tok/s" in out.getvalue() and "ETA" in out.getvalue()
        bar.update(10, tokens=100, loss=1.25)
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("distill: 10/10 steps (100%) loss 1.2500") and "ETA" not in lines[-1]
    assert len(lines) == 2  # the final state is not printed twice


def test_throttled_when_not_a_terminal_but_the_end_is_always_said():
    out = io.StringIO()
    with progress.Bar("extract t1 code/x", total=1000, unit="sequences", stream=out, every_s=3600) as bar:
        for i in range(1, 1001):
            bar.update(i, tokens=32)
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]
    assert out.getvalue().startswith("extract t1 code/x: 1000/1000 sequences (100%)")


def test_advance_moves_the_current_bar_and_is_a_noop_without_one():
    progress.advance(5)  # no bar: nothing happens
    out = io.StringIO()
    with progress.Bar("evaluate", total=None, unit="sequences", stream=out, every_s=3600).current() as bar:
        progress.expect(8)
        progress.advance(4, tokens=10)
        progress.advance(4, tokens=10)
        assert (bar.done, bar.total, bar.tokens) == (8, 8, 20)
    assert progress.current() is None
    assert out.getvalue().startswith("evaluate: 8/8 sequences (100%)")


def test_a_one_line_notice_when_epochs_cap_max_steps():
    from structlog.testing import capture_logs

    from nexus_core.config import DistillSettings
    from nexus_core.stages.distill import _epochs_cap

    with capture_logs() as logs:
        capped = _epochs_cap(DistillSettings(epochs=1, max_steps=400), planned=63, per_epoch=63)
        assert _epochs_cap(DistillSettings(epochs=10, max_steps=400), planned=630, per_epoch=63) is None
        assert _epochs_cap(DistillSettings(epochs=1, max_steps=0), planned=63, per_epoch=63) is None
    assert capped == {"epochs": 1, "max_steps": 400, "steps": 63, "batches_per_epoch": 63}
    assert len(logs) == 1 and logs[0]["log_level"] == "warning"
    assert "epochs=1 caps max_steps=400 at 63 steps" in logs[0]["event"]
