"""Settings: one typed source; toml < env < flags; unknown keys are errors naming the key."""

from __future__ import annotations

import argparse

import pytest

from nexus_core.config import add_cli_flags, load_settings, parse_bytes
from nexus_core.errors import ConfigError


def test_precedence_toml_env_flags(tmp_path):
    (tmp_path / "nexus.toml").write_text("[distill]\nmax_steps = 10\nlr = 0.5\n[extract]\ntop_k = 4\n")
    p = argparse.ArgumentParser()
    add_cli_flags(p)
    args = p.parse_args(["--distill-max-steps", "30", "--sli", "always", "--memory-budget", "12GB"])
    cfg = load_settings(tmp_path, args, environ={"NEXUS_DISTILL_MAX_STEPS": "20", "NEXUS_EXTRACT_TOP_K": "16"})
    assert cfg.distill.max_steps == 30  # flag beats env beats toml
    assert cfg.extract.top_k == 16  # env beats toml
    assert cfg.distill.lr == 0.5  # toml beats default
    assert cfg.run.sli == "always" and parse_bytes(cfg.memory.budget) == 12 * 10**9


@pytest.mark.parametrize("toml, match", [
    ("[distill]\nmax_stepz = 1\n", "max_stepz"),
    ("[distil]\nmax_steps = 1\n", r"\[distil\]"),
    ("[distill]\nmax_steps = 'many'\n", "max_steps"),
    ("[distill]\nalpha = 2.0\n", "--distill-alpha"),
    ("[run]\nsli = 'sometimes'\n", "--sli"),
    ("not toml at all [", "not valid TOML"),
])
def test_bad_settings_name_the_key(tmp_path, toml, match):
    (tmp_path / "nexus.toml").write_text(toml)
    with pytest.raises(ConfigError, match=match):
        load_settings(tmp_path, environ={})


def test_unknown_env_key_in_a_known_section_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="NEXUS_DISTILL_MAXSTEPS"):
        load_settings(tmp_path, environ={"NEXUS_DISTILL_MAXSTEPS": "3"})
    # variables that are not settings are left alone
    load_settings(tmp_path, environ={"NEXUS_HOME": "/x", "NEXUS_GPU_SENSOR": "file:/t"})


def test_every_setting_has_a_flag_with_help():
    p = argparse.ArgumentParser()
    add_cli_flags(p)
    helps = {a.dest: a.help for a in p._actions if a.dest.startswith("cfg__")}
    cfg = load_settings("/nonexistent", environ={})
    n = sum(len(v) for v in cfg.to_dict().values())
    assert len(helps) == n and all(h for h in helps.values())


def test_memory_budget_parse():
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("16GiB") == 16 * 2**30
    with pytest.raises(ConfigError, match="memory-budget"):
        parse_bytes("lots")


def test_keep_settings_writes_what_a_later_plain_run_resolves_to(tmp_path):
    from nexus_core.config import keep_settings

    (tmp_path / "nexus.toml").write_text("[distill]\nmax_steps = 10\n[memory]\nbudget = \"12GB\"\n")
    p = argparse.ArgumentParser()
    add_cli_flags(p)
    args = p.parse_args(["--distill-lr", "0.002", "--datasets", "reasoning/arithmetic"])
    demo = {"extract": {"max_samples": 256}, "distill": {"max_steps": 400, "epochs": 1000}}
    wanted = load_settings(tmp_path, args, environ={}, defaults=demo)
    assert keep_settings(tmp_path, args, demo, why="kept by a test") == tmp_path / "nexus.toml"
    again = load_settings(tmp_path, environ={})  # no flags, no defaults: the file says it all
    assert again == wanted
    assert again.distill.max_steps == 10  # the file's own key beat the demo's default
    assert (again.distill.lr, again.distill.epochs, again.memory.budget) == (0.002, 1000, "12GB")
    assert (tmp_path / "nexus.toml").read_text().startswith("# Settings of this workdir (kept by a test")
    assert keep_settings(tmp_path, args, demo) is None  # nothing new: the file is left alone
    assert not list(tmp_path.glob(".*.tmp"))
