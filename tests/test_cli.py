"""The ``moesim`` command line: exact lines and exit codes, in-process through ``sim.cli.main`` and, where the
console script itself matters (entry point, tracebacks, imports), through a real subprocess."""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

import sim
from sim.cli import build_parser, main
from sim.errors import ScenarioError
from sim.profile import shipped_profiles
from sim.scenario import json_schema_text, shipped_scenarios
from sim.spec import get_model, load_catalog

UNKNOWN_KEY = "unknown key (check the spelling; `moesim scenario schema` lists the valid keys)"


def moesim_script() -> str:
    """The installed console script of the interpreter running the tests."""
    name = "moesim.exe" if sys.platform == "win32" else "moesim"
    script = Path(sysconfig.get_path("scripts")) / name
    assert script.is_file(), f"no console script at {script}; install the package (pip install -e .)"
    return str(script)


def run_moesim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([moesim_script(), *args], capture_output=True, text=True, timeout=120, check=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """main(argv) in-process: (exit code, stdout, stderr); argparse's own exits count as exit codes."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def typo_file(write_scenario, tiny) -> Path:
    data = copy.deepcopy(tiny)  # a test may use `tiny` too
    data["policies"]["expert_cache"] = {"name": "lru", "scop": "global"}
    return write_scenario(data, "typo.yaml")


# ---------------------------------------------------------------- version and help


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert (code, out) == (0, f"moesim {sim.__version__}\n")


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and subcommand of the parser, found by walking it (so a new command is covered)."""
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += _command_paths(sub, (*prefix, name))
    return paths


COMMANDS = _command_paths(build_parser())


def test_the_command_tree_is_what_the_issue_asks_for():
    assert set(COMMANDS) >= {
        (), ("models",), ("profiles",), ("simulate",),
        ("scenario",), ("scenario", "check"), ("scenario", "show"), ("scenario", "schema"), ("scenario", "list"),
    }


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "moesim")
def test_help_on_every_command(capsys, command):
    code, out, err = run(capsys, *command, "--help")
    assert code == 0
    assert out.startswith(f"usage: {' '.join(('moesim', *command))} ")
    assert err == ""


def test_no_command_prints_help_to_stderr_and_exits_2(capsys):
    code, out, err = run(capsys)
    assert (code, out) == (2, "")
    assert err.startswith("usage: moesim ")


def test_scenario_without_action_prints_its_usage_and_exits_2(capsys):
    code, out, err = run(capsys, "scenario")
    assert (code, out) == (2, "")
    assert err.startswith("usage: moesim scenario ")


# ---------------------------------------------------------------- models and profiles


def test_models_lists_every_catalog_model(capsys):
    code, out, err = run(capsys, "models")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["model", "total", "active", "experts", "top-k", "shared", "MB/expert", "KV", "KiB/token"]
    names = [line.split()[0] for line in lines[2:]]
    assert names == [spec.name for spec in load_catalog().values()]
    assert len(names) >= 10


def test_models_row_has_the_catalog_numbers(capsys):
    """Mixtral: 8 experts, top-2, 352,321,536 B = 352.3 MB per expert."""
    _, out, _ = run(capsys, "models")
    row = next(line for line in out.splitlines() if line.startswith("mixtral-8x7b "))
    cells = row.split()
    assert cells[3:7] == ["8", "2", "0", "352.3"]


def test_models_show_one(capsys):
    code, out, err = run(capsys, "models", "show", "mixtral-8x7b")
    assert (code, err) == (0, "")
    fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    spec = get_model("mixtral-8x7b")
    assert fields["name"] == "mixtral-8x7b"
    assert fields["num_experts"] == "8"
    assert fields["top_k"] == "2"
    assert fields["hidden_size"] == str(spec.hidden_size)


def test_models_show_unknown_is_one_line_and_exit_2(capsys):
    code, out, err = run(capsys, "models", "show", "nosuch")
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert err.startswith("moesim: error: unknown model 'nosuch'; known: ")
    assert "mixtral-8x7b" in err


def test_models_show_close_name_suggests_it(capsys):
    code, _, err = run(capsys, "models", "show", "mixtral-8x7")
    assert code == 2
    assert err.startswith("moesim: error: unknown model 'mixtral-8x7'; did you mean 'mixtral-8x7b'? ")


def test_models_show_without_name(capsys):
    code, out, err = run(capsys, "models", "show")
    assert (code, out, err) == (2, "", "moesim: error: 'models show' needs a name\n")


def test_profiles_lists_the_four_shipped_profiles(capsys):
    code, out, err = run(capsys, "profiles")
    assert (code, err) == (0, "")
    names = [line.split()[0] for line in out.splitlines()[2:]]
    assert names == shipped_profiles()
    assert {"a100-40gb", "a100-80gb", "h100-80gb", "h200"} <= set(names)


def test_profiles_show_prints_the_profile_as_json(capsys):
    code, out, _ = run(capsys, "profiles", "show", "h100-80gb")
    assert code == 0
    profile = json.loads(out)
    assert profile["name"] == "h100-80gb"
    assert profile["gpu"]["memory_bytes"] == 80 * 2**30


def test_profiles_show_unknown(capsys):
    code, out, err = run(capsys, "profiles", "show", "h300")
    assert (code, out) == (2, "")
    assert err == f"moesim: error: unknown profile 'h300'; shipped profiles: {', '.join(shipped_profiles())}\n"


# ---------------------------------------------------------------- scenario check


def test_scenario_check_ok(capsys, write_scenario, tiny):
    path = write_scenario(tiny)
    code, out, err = run(capsys, "scenario", "check", str(path))
    assert (code, out, err) == (0, f"{path}: ok (olmoe-1b-7b on 1x h100-80gb)\n", "")


def test_scenario_check_the_shipped_scenarios_by_name(capsys):
    code, out, err = run(capsys, "scenario", "check", *shipped_scenarios())
    assert (code, err) == (0, "")
    assert [line.split(":")[0] for line in out.splitlines()] == shipped_scenarios()


def test_scenario_check_nested_typo_is_one_line_exit_2(capsys, typo_file):
    code, out, err = run(capsys, "scenario", "check", str(typo_file))
    assert (code, out) == (2, "")
    assert err == f"moesim: error: {typo_file}: policies.expert_cache.scop: {UNKNOWN_KEY}\n"


def test_scenario_check_stops_at_the_first_bad_file(capsys, write_scenario, tiny, typo_file):
    good = write_scenario(tiny, "good.yaml")
    code, out, err = run(capsys, "scenario", "check", str(good), str(typo_file), str(good))
    assert code == 2
    assert out == f"{good}: ok (olmoe-1b-7b on 1x h100-80gb)\n"
    assert err == f"moesim: error: {typo_file}: policies.expert_cache.scop: {UNKNOWN_KEY}\n"


def test_scenario_check_counts_sweep_points(capsys, write_scenario, tiny):
    tiny["hardware"]["expert_memory"] = {"fraction": 0.5}
    tiny["sweep"] = {"axes": {"hardware.expert_memory.fraction": [0.2, 0.4], "policies.batching.max_num_seqs": [8, 16, 32]}}
    path = write_scenario(tiny)
    code, out, _ = run(capsys, "scenario", "check", str(path))
    assert (code, out) == (0, f"{path}: ok (olmoe-1b-7b on 1x h100-80gb, 6 sweep points)\n")


def test_scenario_check_a_sweep_point_that_does_not_resolve_names_the_point(capsys, write_scenario, tiny):
    tiny["sweep"] = {"axes": {"hardware.profile": ["h100-80gb", "h300"]}}
    path = write_scenario(tiny)
    code, out, err = run(capsys, "scenario", "check", str(path))
    assert (code, out) == (2, "")
    assert err == (
        f"moesim: error: {path}: hardware.profile: unknown profile 'h300'; shipped profiles: "
        f"{', '.join(shipped_profiles())} [sweep point hardware.profile=h300]\n"
    )


def test_scenario_check_memory_that_does_not_fit_a_sweep_point(capsys, write_scenario, tiny):
    """The second point asks for 100 GB of experts on an 85.9 GB H100."""
    tiny["hardware"]["expert_memory"] = {"bytes": 1.0e10}
    tiny["sweep"] = {"axes": {"hardware.expert_memory.bytes": [1.0e10, 1.0e11]}}
    path = write_scenario(tiny)
    code, _, err = run(capsys, "scenario", "check", str(path))
    assert code == 2
    assert err == (
        f"moesim: error: {path}: hardware.expert_memory: 100.0 GB of experts is more than the GPU's 85.9 GB "
        "[sweep point hardware.expert_memory.bytes=100000000000.0]\n"
    )


def test_scenario_check_missing_file(capsys, tmp_path):
    path = tmp_path / "nosuch.yaml"
    code, _, err = run(capsys, "scenario", "check", str(path))
    assert code == 2
    assert err.startswith(f"moesim: error: {path}: no such file, and not a shipped scenario (shipped: ")
    assert err.count("\n") == 1


def test_debug_raises_the_error_instead(write_scenario, typo_file):
    with pytest.raises(ScenarioError, match="policies.expert_cache.scop"):
        main(["--debug", "scenario", "check", str(typo_file)])


# ---------------------------------------------------------------- scenario show, schema, list


def test_scenario_show_is_yaml_with_defaults_filled(capsys, write_scenario, tiny):
    path = write_scenario(tiny)
    code, out, err = run(capsys, "scenario", "show", str(path))
    assert (code, err) == (0, "")
    shown = yaml.safe_load(out)
    assert "batching" not in tiny["policies"]
    assert shown["policies"]["batching"]["max_num_seqs"] == 256
    assert shown["policies"]["batching"]["max_batch_tokens"] == 8192
    assert shown["policies"]["expert_cache"] == {"name": "all_resident"}
    assert shown["workload"]["routing"] == {"kind": "uniform"}
    assert shown["workload"]["max_requests"] == 5
    assert shown["model"]["spec"]["name"] == "olmoe-1b-7b"
    assert shown["model"]["spec"]["num_experts"] == 64
    assert "#   expert_memory_bytes: " + str(float(16 * 64 * 12_582_912)) in out


def test_scenario_show_an_invalid_file(capsys, typo_file):
    code, out, err = run(capsys, "scenario", "show", str(typo_file))
    assert (code, out) == (2, "")
    assert err == f"moesim: error: {typo_file}: policies.expert_cache.scop: {UNKNOWN_KEY}\n"


def test_scenario_schema_prints_and_writes_the_schema(capsys, tmp_path):
    code, out, _ = run(capsys, "scenario", "schema")
    assert (code, out) == (0, json_schema_text())
    target = tmp_path / "schema.json"
    code, out, _ = run(capsys, "scenario", "schema", "--out", str(target))
    assert (code, out) == (0, f"wrote {target}\n")
    assert target.read_text(encoding="utf-8") == json_schema_text()
    assert json.loads(target.read_text(encoding="utf-8"))["title"] == "moesim scenario"


def test_scenario_list(capsys):
    code, out, _ = run(capsys, "scenario", "list")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == shipped_scenarios()


# ---------------------------------------------------------------- simulate (tiny only)


def test_simulate_tiny_scenario_as_json(capsys, write_scenario, tiny):
    code, out, err = run(capsys, "simulate", str(write_scenario(tiny)), "--json", "--no-progress")
    assert code == 0
    summary = json.loads(out)
    assert summary["model"] == "olmoe-1b-7b"
    assert summary["requests"]["arrived"] == 5
    assert summary["requests"]["completed"] == 5
    assert summary["expert_cache"]["misses"] == 0  # every expert resident


def test_simulate_invalid_scenario_is_one_line(capsys, typo_file):
    code, out, err = run(capsys, "simulate", str(typo_file), "--no-progress")
    assert (code, out) == (2, "")
    assert err == f"moesim: error: {typo_file}: policies.expert_cache.scop: {UNKNOWN_KEY}\n"


# ---------------------------------------------------------------- the real console script


def test_console_script_version():
    proc = run_moesim("--version")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"moesim {sim.__version__}\n", "")


def test_console_script_nested_typo_is_one_line_without_traceback(typo_file):
    proc = run_moesim("scenario", "check", str(typo_file))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == f"moesim: error: {typo_file}: policies.expert_cache.scop: {UNKNOWN_KEY}\n"
    assert "Traceback" not in proc.stderr


def test_console_script_debug_shows_the_traceback(typo_file):
    proc = run_moesim("--debug", "scenario", "check", str(typo_file))
    assert proc.returncode not in (0, 2)
    assert "Traceback (most recent call last)" in proc.stderr
    assert f"sim.errors.ScenarioError: {typo_file}: policies.expert_cache.scop: {UNKNOWN_KEY}" in proc.stderr


def test_console_script_models_show_unknown():
    proc = run_moesim("models", "show", "nosuch")
    assert proc.returncode == 2
    assert proc.stderr.startswith("moesim: error: unknown model 'nosuch'")
    assert proc.stderr.count("\n") == 1


def test_import_leaves_torch_out():
    code = (
        "import sys, sim, sim.scenario, sim.engine.simulation, sim.cli\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'calibrate')))\n"
        "print(bad)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout == "[]\n"


def test_a_command_needing_torch_without_it_is_one_line(capsys, monkeypatch):
    """`pip install .` has no torch: calibrate/validate say what to install instead of a traceback."""
    import sim.cli

    def needs_torch(args):
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    parser = sim.cli.build_parser
    monkeypatch.setattr(sim.cli, "build_parser", lambda: _with_func(parser(), needs_torch))
    assert sim.cli.main(["models"]) == 2
    err = capsys.readouterr().err
    assert err == "moesim: error: 'models' needs PyTorch: pip install 'moesim[calibrate]' (torch 2.13.0, CPU build)\n"


def _with_func(parser, func):
    parser.set_defaults(func=func)
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            sub.set_defaults(func=func)
    return parser


def test_scenario_check_ep_that_does_not_divide_the_gpus_is_one_line_exit_2(capsys, write_scenario, tiny):
    tiny["hardware"] = {**tiny.get("hardware", {}), "num_gpus": 8, "parallelism": {"ep": 3}}
    path = write_scenario(tiny)
    code, out, err = run(capsys, "scenario", "check", str(path))
    assert (code, out) == (2, "")
    assert err == (f"moesim: error: {path}: hardware: parallelism: ep x tp = 3 x 1 = 3 GPUs per replica does not "
                   f"divide num_gpus (8)\n")
