"""The rules' hygiene: `snakemake --lint` is clean for every shipped config, and every rule's conda env can
import what its job imports.

With ``--sdm conda`` each rule runs in the env its ``conda:`` names; a job whose code imports a package that env
lacks fails there and nowhere else (the tests run in one venv that has everything). This reads the rules and the
package's syntax trees: a rule's ``emlab <command>`` -> the command's function in ``emlab.cli`` -> the modules
and functions it imports -> every third-party package imported on the way (module top levels, transitively, and
the bodies of the functions the command calls by import), and checks each against the env's dependencies.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from package_imports import third_party, tree

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


@pytest.mark.parametrize("configfile", [None, *sorted((ROOT / "configs").glob("*.yaml"))],
                         ids=lambda p: p.stem if p else "config.yaml")
def test_snakemake_lint_is_clean(configfile):
    """Rules hold rules only (helpers in rules/common.smk), paths come from input/output, every rule has a log
    and an env: what `snakemake --lint` checks, for the default run and every shipped config."""
    args = [str(SNAKEMAKE), "--lint", "--cores", "1"] + (["--configfile", str(configfile)] if configfile else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # the hub configs' models are checked when a job loads them
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Lints for" not in r.stdout + r.stderr, r.stdout + r.stderr

# conda package name -> the name it is imported by, where they differ
IMPORT_NAME = {"pytorch": "torch", "scikit-learn": "sklearn", "matplotlib-base": "matplotlib", "pyyaml": "yaml"}


def env_packages(env_file: Path) -> set[str]:
    deps = yaml.safe_load(env_file.read_text())["dependencies"]
    names = set()
    for d in deps:
        for spec in d["pip"] if isinstance(d, dict) else [d]:
            name = re.split(r"[<>=!\s\[]", spec, maxsplit=1)[0]
            names.add(IMPORT_NAME.get(name, name).replace("-", "_"))
    return names


def rules() -> list[tuple[str, str, str]]:
    """(rule, env file, emlab command) for every rule in rules/*.smk."""
    out = []
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        text = smk.read_text()
        blocks = re.split(r"^\s*rule (\w+):\s*$", text, flags=re.M)
        for name, body in zip(blocks[1::2], blocks[2::2]):
            env = re.search(r'conda:\s*\n\s*"\.\./envs/([\w.]+)"', body)
            cmd = re.search(r"-m emlab ([\w-]+)", body)
            out.append((f"{smk.name}:{name}", env and env.group(1), cmd and cmd.group(1)))
    return out


def command_function(command: str) -> str:
    for node in tree("emlab.cli").body:
        if isinstance(node, ast.FunctionDef):
            for d in node.decorator_list:
                if (isinstance(d, ast.Call) and getattr(d.func, "id", None) == "command"
                        and d.args[0].value == command):
                    return node.name
    raise AssertionError(f"no emlab command {command!r}")


def command_imports(command: str) -> set[str]:
    # the program itself (emlab.cli's top level, main and run), then the command's own function
    return third_party("emlab.cli", ["main", "run", command_function(command)], set())


def test_every_rule_names_an_env_and_an_emlab_command():
    found = rules()
    assert len(found) >= 30, found
    missing = [r for r, env, cmd in found if not env or not cmd or not (ROOT / "envs" / env).exists()]
    assert not missing, f"rules without a conda env file or an emlab command: {missing}"


@pytest.mark.parametrize("rule,env,command", rules(), ids=[r for r, _, _ in rules()])
def test_the_rules_env_has_what_its_job_imports(rule, env, command):
    needed = command_imports(command)
    lacking = sorted(needed - env_packages(ROOT / "envs" / env))
    assert not lacking, f"{rule}: `emlab {command}` imports {lacking}, which envs/{env} does not install"


def test_every_rule_can_be_given_resources():
    """resources.rules.<rule> names any rule of the workflow, and only those."""
    from emlab.config import load_schema

    allowed = set(load_schema()["properties"]["resources"]["properties"]["rules"]["propertyNames"]["enum"])
    assert allowed == {r.split(":")[1] for r, _, _ in rules()}


def test_the_check_sees_a_package_an_env_lacks():
    """The analysis itself: the steering sweep reads grades and draws a figure, the steered sampler imports
    torch; a check that found neither would pass every rule."""
    assert "matplotlib" in command_imports("steer-sweep")
    assert "torch" in command_imports("steer-sample")
    assert "torch" not in env_packages(ROOT / "envs" / "analysis.yaml")


def test_realignment_and_preventative_fine_tunes_take_the_fine_tunes_resources(tmp_path):
    """A config that gives `finetune` a GPU gives the re-alignment and preventative fine-tunes one (and their
    samplings the `sample` rule's), unless their own rule sets the key (rules/common.smk RESOURCES_LIKE)."""
    overlay = tmp_path / "resources.yaml"
    overlay.write_text(yaml.safe_dump({
        "results_dir": str(tmp_path / "results"),
        "resources": {"rules": {"finetune": {"gpu": 1, "mem_mb": 7000}, "realign": {"mem_mb": 3000},
                                "sample": {"gpu": 1}}}}))
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "snakemake", "--dry-run", "--cores", "2", "--configfile",
                          str(root / "config.yaml"), str(overlay)], cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    resources = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", text):
        if m := re.match(r"(?:local)?rule (\w+):", block):
            if r := re.search(r"resources: (.*)", block):
                resources.setdefault(m[1], r[1])
    assert "gpu=1" in resources["finetune_prevent"] and "mem_mb=7000" in resources["finetune_prevent"]
    assert "gpu=1" in resources["realign"] and "mem_mb=3000" in resources["realign"]  # its own key wins
    assert "gpu=1" in resources["realign_eval"] and "gpu=1" in resources["alarm_emergence"]
    assert "gpu=0" in resources["rl"]  # not one of them: the default


def test_a_world_set_reruns_for_its_own_settings_and_world_edits_alone(tmp_path):
    """A world set's job depends on the world files, the seed, the set size and its own kind's settings: adding a
    domain or changing pretraining leaves the sets already written alone; a new n_train or an edited world spec
    (the spec a world extends included) plans them again."""
    from workflow_runner import copy_workflow, snakemake

    wd = copy_workflow(tmp_path / "wf")
    target = "results/datasets/health_subtle.jsonl"

    def overlay(name: str, **cfg) -> str:
        (wd / name).write_text(yaml.safe_dump(cfg))
        return name

    def planned(*configfiles: str) -> str:
        out = snakemake(wd, "-n", target, configfile=["config.yaml", *configfiles])
        text = out.stdout + out.stderr
        return "Nothing to be done" if "Nothing to be done" in text else text

    snakemake(wd, target)
    assert (wd / target).exists()
    more = overlay("more.yaml", datasets={"domains": ["health", "legal", "finance"], "mixtures": {"fractions": [0.5]}},
                   organism={"pretrain": {"steps": 7}})
    assert planned(more) == "Nothing to be done"
    assert "params" in planned(overlay("size.yaml", datasets={"n_train": 50}))
    base_world = wd / "resources/world/persona_world.yaml"
    code = overlay("code.yaml", organism={"world": "resources/world/persona_world_code.yaml"})
    assert "health_subtle" in planned(code)  # another world: another world file among the inputs
    base_world.write_text(base_world.read_text() + "\n# an edit\n")  # Snakemake reruns on new content, not a touch
    later = (wd / target).stat().st_mtime_ns + 10**9
    os.utime(base_world, ns=(later, later))
    assert "updated input files" in planned()
