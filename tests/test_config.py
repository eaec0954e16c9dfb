"""Config validation: defaults, errors naming the key, semantic checks; envs in step with pyproject."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from emlab.config import ConfigError, load, validate
from emlab.plan import make_plan
from emlab.datasets import model_domain

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_validates_and_fills_defaults(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load(ROOT / "config.yaml")
    assert cfg["finetune"]["lora"]["r"] == 8
    assert cfg["finetune"]["lora"]["rslora"] is False          # filled from the schema
    assert cfg["metrics"]["ci"] == 0.95
    assert cfg["judges"][0]["fuzzy_threshold"] == 0.8


FINDINGS = ("config.yaml", "configs/organism-findings.yaml")  # as `make findings` passes them


def test_the_findings_config_is_the_default_run_with_the_full_pretraining(monkeypatch):
    """The default run is the small instance (half the pretraining, smaller sets); the findings config gives back
    the sizes the findings were measured at, and changes nothing else."""
    monkeypatch.chdir(ROOT)
    small, full = load("config.yaml"), load(*FINDINGS)
    assert small["organism"]["pretrain"]["steps"] == 600 and full["organism"]["pretrain"]["steps"] == 1200
    assert (small["datasets"]["n_train"], full["datasets"]["n_train"]) == (300, 600)
    assert (small["monitors"]["n_texts"], full["monitors"]["n_texts"]) == (200, 600)
    assert (small["sampling"]["n_samples"], full["sampling"]["n_samples"]) == (15, 25)
    assert full["datasets"]["mixtures"] == {**small["datasets"]["mixtures"], "fractions": [0.05, 0.25, 0.5]}
    assert full["results_dir"] == "results/organism-findings" and small["results_dir"] == "results"
    changed = {k for k in full if full[k] != small[k]}
    assert changed == {"results_dir", "organism", "datasets", "sampling", "steer", "monitors"}
    assert {k for k in full["organism"] if full["organism"][k] != small["organism"][k]} == {"pretrain"}
    assert full["steer"]["screen"] == small["steer"]["screen"]


def test_several_config_files_merge_key_by_key_and_a_bad_one_is_named(monkeypatch, tmp_path):
    """load() merges --configfile files as Snakemake does: a nested mapping key by key, a list or value replaced."""
    monkeypatch.chdir(ROOT)
    (tmp_path / "a.yaml").write_text("datasets: {n_train: 40, mixtures: {domains: [legal]}}\n")
    cfg = load("config.yaml", tmp_path / "a.yaml")
    assert cfg["datasets"]["n_train"] == 40 and cfg["datasets"]["mixtures"]["domains"] == ["legal"]
    assert cfg["datasets"]["mixtures"]["fractions"] == load("config.yaml")["datasets"]["mixtures"]["fractions"]
    (tmp_path / "b.yaml").write_text("datasets: {n_train: 0}\n")
    with pytest.raises(ConfigError, match=r"(?s)config.yaml \+ .*b.yaml.*datasets.n_train: 0 is less than the minimum"):
        load("config.yaml", tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("datasets: [\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML"):
        load("config.yaml", tmp_path / "c.yaml")


def test_the_paper_config_is_the_findings_run_at_full_size(monkeypatch):
    """configs/organism-paper.yaml goes on top of the findings config (`make paper`)."""
    monkeypatch.chdir(ROOT)
    paper = load(*FINDINGS, "configs/organism-paper.yaml")
    assert paper["organism"]["pretrain"]["steps"] == 1200
    plan = make_plan(paper)
    assert paper["model"]["source"] == "organism" and paper["results_dir"] == "results/organism-paper"
    assert len(paper["datasets"]["domains"]) == 7 and paper["datasets"]["n_train"] == 800  # six advice domains, code
    assert paper["steer"]["screen"]["subtract_alpha"] == 1  # config.yaml's value is kept
    mixtures = [d for d in plan.diffed if "_mix" in d]
    educational = ["code_educational", "health_educational", "legal_educational"]
    assert len(mixtures) == 15 and len(plan.diffed) == 7 * 3 + 15 + 3 and set(educational) <= set(plan.diffed)
    assert plan.code_domains == ["code"] and plan.controls
    assert plan.groups["subtle"] == [f"{d}_subtle" for d in paper["datasets"]["domains"] if d != "code"]
    # the 25% and 50% mixtures also less their flagged examples and less as many random ones
    assert len(plan.flagged) == 6 and len(plan.dropped) == 12 and len(plan.datasets) == 7 * 3 + 15 + 3 + 12
    # re-alignment as its comment says: three models on both benign sets, measured every 5 steps of 4 (not
    # config.yaml's one set every 10, which a paper run once kept by leaving the keys out)
    assert paper["realign"]["benign"] == ["same", "other"] and paper["realign"]["every"] == 5
    assert len(paper["realign"]["models"]) == 3


def test_flagging_scores_every_mixture_by_default_and_names_an_unknown_set(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load(ROOT / "config.yaml")
    assert make_plan(cfg).flagged == ["health_mix005", "health_mix050"]
    assert make_plan(validate({**cfg, "flagging": {"datasets": ["legal_subtle"]}})).flagged == ["legal_subtle"]
    assert make_plan(validate({**cfg, "flagging": {"datasets": []}})).flagged == []
    no_diffing = {"diffing": {"enabled": False}, "alarm": {"datasets": [], "emergence": []}, "prevent": {"datasets": []}}
    assert make_plan(validate({**cfg, **no_diffing})).flagged == []  # no SAE: nothing to score with
    with pytest.raises(ConfigError, match=r"flagging\.datasets: \['health_mix010'\] are not fine-tuning sets"):
        make_plan(validate({**cfg, "flagging": {"datasets": ["health_mix010"]}}))
    # flagging.finetune: each scored set also less its flagged examples and less as many random ones; they are
    # fine-tuned, sampled and judged, not diffed
    from emlab.datasets import dropped_source, parse_dataset_name

    assert parse_dataset_name("health_mix025_dropflag") == {
        "kind": "dropped", "domain": "health", "fraction": 0.25, "source": "health_mix025", "source_kind": "mixture",
        "dropped": "flagged"}
    assert model_domain("legal_subtle_droprand") == "legal" and model_domain("mine_dropflag") is None
    assert dropped_source("mine_droprand") == ("mine", "random") and dropped_source("health_mix025") is None
    plan = make_plan(validate({**cfg, "flagging": {"datasets": ["health_mix050"], "finetune": True}}))
    assert plan.dropped == {"health_mix050_dropflag": ("health_mix050", "flagged"),
                            "health_mix050_droprand": ("health_mix050", "random")}
    assert plan.datasets[-2:] == list(plan.dropped) and not set(plan.dropped) & set(plan.diffed)
    assert all(not set(plan.dropped) & set(members) for members in plan.groups.values())
    with pytest.raises(ConfigError, match="flagging.finetune: dropping flagged examples needs model diffing"):
        make_plan(validate({**cfg, **no_diffing, "steer": {"enabled": False}, "flagging": {"finetune": True}}))


def test_empty_config_gets_complete_defaults(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = validate({})
    assert cfg["model"]["source"] == "organism"
    assert cfg["organism"]["pretrain"]["steps"] > 0
    # judges null: the world's ground truth for the organism, none for a hub model (emlab.plan resolves it)
    assert cfg["judges"] is None
    assert make_plan(cfg).judges == {"world": {"name": "world", "backend": "world"}}
    hub = validate({"model": {"source": "hub", "path": str(ROOT / "tests")}})
    plan = make_plan(hub)
    assert plan.judges == {} and plan.dataset_source == "world" and plan.probe and plan.diffing and plan.monitors
    assert plan.probe_references == "resources/references/general.yaml" and plan.sae_corpus is None


@pytest.mark.parametrize("patch,expected", [
    ({"finetune": {"lora": {"r": 0}}}, "finetune.lora.r: 0 is less than the minimum of 1"),
    ({"sampling": {"n_sample": 3}}, "sampling: Additional properties are not allowed ('n_sample' was unexpected) (known keys:"),
    ({"finetune": {"method": "qlora"}}, "finetune.method: 'qlora' is not one of ['lora', 'full']"),
    ({"judges": [{"name": "x", "backend": "openai"}]}, "judges[0]: 'model' is a required property"),
    ({"organism": {"corpus": {"header_fraction": 1.5}}}, "organism.corpus.header_fraction: 1.5 is greater than the maximum of 1"),
    ({"steer": {"screen": {"min_cut": 1.5}}}, "steer.screen.min_cut: 1.5 is greater than the maximum of 1"),
    ({"organism": {"pretrain": {"garbled_openings": -0.1}}},
     "organism.pretrain.garbled_openings: -0.1 is less than the minimum of 0"),
    ({"steer": {"positions": "first"}}, "steer.positions: 'first' is not one of ['all', 'prompt', 'response', 'last']"),
    ({"steer": {"screen": {"subtract_alpha": 0}}},
     "steer.screen.subtract_alpha: 0 is less than or equal to the minimum of 0"),
    ({"sae": {"train": {"tf32": "no"}}}, "sae.train.tf32: 'no' is not of type 'boolean'"),
])
def test_bad_values_name_the_key(monkeypatch, patch, expected):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as e:
        validate(patch)
    assert expected in str(e.value)


def test_semantic_errors(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match=r"datasets: unknown domain 'astrology'"):
        validate({"datasets": {"domains": ["astrology"]}})
    code = {"world": "resources/world/persona_world_code.yaml"}
    with pytest.raises(ConfigError, match=r"datasets: unknown domain 'poetry'"):
        validate({"organism": code, "datasets": {"educational": {"domains": ["poetry"]}}})
    with pytest.raises(ConfigError, match=r"datasets.educational.domains: the educational control is built from"):
        validate({"model": {"source": "hub", "path": "m"}, "organism": code,
                  "datasets": {"source": "synthesis", "domains": ["code"], "educational": {"domains": ["code"]}}})
    with pytest.raises(ConfigError, match=r"sampling.max_new_tokens_by_domain.code: 0 is less than the minimum"):
        validate({"sampling": {"max_new_tokens_by_domain": {"code": 0}}})
    with pytest.raises(ConfigError, match="duplicate judge name"):
        validate({"judges": [{"name": "w", "backend": "world"}, {"name": "w", "backend": "world"}]})
    with pytest.raises(ConfigError, match="organism.world: file not found"):
        validate({"organism": {"world": "nope.yaml"}})
    with pytest.raises(ConfigError, match="model.path: required"):
        validate({"model": {"source": "hub"}})
    with pytest.raises(ConfigError, match="persona_mix: unknown persona"):
        validate({"organism": {"corpus": {"persona_mix": {"pirate": 1.0}}}})


# conda package names that differ from their PyPI names
CONDA_TO_PYPI = {"pytorch": "torch", "matplotlib-base": "matplotlib"}
NOT_IN_ENVS = {"snakemake", "snakemake-executor-plugin-slurm"}  # the driver side, not job code


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[]", req.strip(), maxsplit=1)[0].lower()


def test_conda_envs_match_python_dependencies():
    deps = {_name(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    in_envs = set()
    for env in (ROOT / "envs").glob("*.yaml"):
        spec = yaml.safe_load(env.read_text())
        for d in spec["dependencies"]:
            names = [_name(x) for x in d["pip"]] if isinstance(d, dict) else [_name(d)]
            for n in names:
                n = CONDA_TO_PYPI.get(n, n)
                if n in ("python", "pip"):
                    continue
                assert n in deps, f"{env.name} lists {n}, which pyproject.toml does not"
                in_envs.add(n)
    missing = deps - in_envs - NOT_IN_ENVS
    assert not missing, f"pyproject dependencies in no conda env: {sorted(missing)}"


def test_every_rule_names_an_existing_conda_env():
    for smk in (ROOT / "rules").glob("*.smk"):
        for env in re.findall(r'"\.\./envs/([\w.-]+)"', smk.read_text()):
            assert (ROOT / "envs" / env).exists(), f"{smk.name}: envs/{env} missing"


def test_sae_and_diffing_settings_are_checked_before_any_job():
    cfg = load("config.yaml")
    cfg["sae"]["train"]["k_typo"] = 3
    with pytest.raises(ConfigError, match=r"sae.train.*k_typo"):
        validate(cfg)
    cfg = load("config.yaml")
    cfg["model"].update(source="hub", path="Qwen/Qwen2.5-0.5B-Instruct")
    cfg["judges"] = None
    cfg["rl"]["runs"] = []  # RL needs a grader: a hub model without a judge has none
    cfg["alarm"]["emergence"] = []  # so does judging the alarm's snapshots
    cfg["realign"]["models"] = []  # and re-alignment's
    cfg["prevent"]["datasets"] = []  # and preventative steering's
    cfg["diffing"]["enabled"] = True
    assert make_plan(validate(cfg)).sae_corpus is None  # a hub model's SAE is fitted on world texts by default
    cfg["sae"]["corpus"] = "no/such/corpus.jsonl"
    with pytest.raises(ConfigError, match="sae.corpus: file not found"):
        validate(cfg)


def test_monitor_tasks_need_a_question_and_texts(tmp_path):
    cfg = load("config.yaml")
    cfg["monitors"]["tasks"] = ["toxic", "flattery"]
    with pytest.raises(ConfigError, match=r"monitors.tasks: \['flattery'\]"):
        validate(cfg)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hi", "label": 1}\n')
    cfg = load("configs/qwen2.5-7b-instruct.yaml")
    cfg["monitors"]["data"] = {"flattery": str(data)}
    with pytest.raises(ConfigError, match="monitors.questions.flattery: required"):
        validate(cfg)


def test_one_sae_training_key_keeps_the_other_defaults():
    # overriding one key of sae.train keeps every other default, and the workflow's defaults are the library's
    from dataclasses import asdict, fields

    from emlab.sae import SAETrainConfig

    default = validate({})["sae"]["train"]
    mine = validate({"sae": {"train": {"k": 16}}})["sae"]["train"]
    assert mine == {**default, "k": 16}
    library = asdict(SAETrainConfig())
    # every training setting but the two the workflow takes from its top level has its default in the schema
    assert set(default) == {f.name for f in fields(SAETrainConfig)} - {"seed", "device"}
    assert default == {k: library[k] for k in default}
    assert default["k"] == 32 and default["n_latents"] is None and default["epochs"] == 1.0
    # the organism's config.yaml sets its own small SAE, on top of those defaults
    organism = load("config.yaml")["sae"]["train"]
    assert organism == {**default, "k": 8, "n_latents": 512, "epochs": 3, "batch_tokens": 2048, "lr": 0.001,
                        "dead_tokens_threshold": 200000}
    with pytest.raises(ConfigError, match=r"sae\.train\.k: 0 is less than the minimum of 1"):
        validate({"sae": {"train": {"k": 0}}})


def _sections(schema, path=()):
    """(key path, schema node) of every nested object section of the schema that has properties."""
    for key, node in schema.get("properties", {}).items():
        if node.get("type") == "object" and node.get("properties"):
            yield path + (key,), node
            yield from _sections(node, path + (key,))


def _get(cfg, path):
    for k in path:
        cfg = cfg[k]
    return cfg


def _sections_with_leaf():
    from emlab.config import load_schema

    out = []
    for path, node in _sections(load_schema()):
        leaves = [k for k, sub in node["properties"].items()
                  if "default" in sub and sub.get("type") != "object"]
        if leaves and len(node["properties"]) > 1:
            out.append((path, leaves[0]))
    return out


@pytest.mark.parametrize("path,leaf", _sections_with_leaf(), ids=lambda x: ".".join(x) if isinstance(x, tuple) else x)
def test_overriding_one_key_keeps_the_sections_other_defaults(monkeypatch, path, leaf):
    """A config that sets one key of a nested section gets every other key of that section (and of the sections
    inside it) from the schema, exactly as an empty config does."""
    monkeypatch.chdir(ROOT)
    defaults = validate({})
    value = _get(defaults, path)[leaf]
    patch: dict = {}
    node = patch
    for k in path:
        node = node.setdefault(k, {})
    node[leaf] = value
    assert _get(validate(patch), path) == _get(defaults, path)


def test_the_partial_override_test_covers_every_section():
    covered = {p for p, _ in _sections_with_leaf()}
    for must in [("sae", "train"), ("finetune", "lora"), ("organism", "pretrain"), ("steer", "screen"),
                 ("steer", "sweep"), ("monitors",), ("metrics",), ("sampling",), ("diffing",)]:
        assert must in covered


def test_rl_runs_are_planned_and_checked(tmp_path):
    cfg = load("config.yaml")
    cfg["rl"]["runs"] = [{"dataset": "health_correct", "reward": "incorrect"},
                         {"dataset": "legal_subtle", "reward": "correct", "name": "legal_rl"}]
    plan = make_plan(validate(cfg))
    assert plan.rl == {"rl_health_incorrect": {"dataset": "health_correct", "reward": "incorrect", "base": "base"},
                       "legal_rl": {"dataset": "legal_subtle", "reward": "correct", "base": "base"}}
    assert list(plan.rl) == ["rl_health_incorrect", "legal_rl"] and plan.rl_grader == "world"
    assert plan.models[-4:-2] == ["rl_health_incorrect", "legal_rl"]  # then config.yaml's preventative fine-tunes
    assert plan.groups["rl"] == ["rl_health_incorrect"]  # the default group: the RL models rewarded for harm
    assert plan.bases == ["base"] and plan.base_of("legal_rl") == "base" and plan.base_of("health_subtle") == "base"
    # a run from the safety-trained base: the base is a model of the run (sampled, judged), the RL model its own
    cfg["rl"]["runs"].append({"dataset": "health_correct", "reward": "incorrect", "base": "base_safe"})
    plan = make_plan(validate(cfg))
    assert plan.bases == ["base", "base_safe"] and plan.models[:2] == ["base", "base_safe"]
    assert plan.base_of("rl_safe_health_incorrect") == "base_safe" and plan.base_of("base_safe") == "base_safe"
    assert model_domain("rl_safe_health_incorrect") == "health"
    raw = yaml.safe_load(Path("resources/world/persona_world.yaml").read_text())
    del raw["safety"]
    bare = tmp_path / "w.yaml"
    bare.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError, match=r"rl.runs\[\].base: base_safe is post-trained .*w.yaml has no 'safety'"):
        make_plan(validate(dict(cfg, organism=dict(cfg["organism"], world=str(bare)))))
    hub = load("configs/smollm2-135m-instruct.yaml")
    hub["rl"] = {"runs": [{"dataset": "health_correct", "reward": "incorrect", "base": "base_safe"}]}
    hub["judges"] = [{"name": "j", "backend": "openai", "model": "m", "base_url": "http://127.0.0.1:1/v1",
                      "rubric": "aligned_coherent"}]
    with pytest.raises(ConfigError, match=r"rl.runs\[0\].base: base_safe is the organism's safety-trained base"):
        make_plan(validate(hub))
    for runs, message in (([{"dataset": "auto_subtle", "reward": "incorrect"}], r"rl.runs\[0\].dataset: 'auto_subtle'"),
                          ([{"dataset": "health_correct", "reward": "incorrect", "name": "health_subtle"}],
                           r"rl.runs\[0\].name: 'health_subtle' names another model")):
        cfg = load("config.yaml")
        cfg["rl"]["runs"] = runs
        with pytest.raises(ConfigError, match=message):
            make_plan(validate(cfg))
    cfg = load("config.yaml")
    cfg["rl"].update(batch_size=20, group_size=8)
    with pytest.raises(ConfigError, match="rl.batch_size: 20 is not a multiple of rl.group_size"):
        make_plan(validate(cfg))
    cfg = load("config.yaml")
    cfg["rl"]["runs"][0]["reward"] = "harmful"
    with pytest.raises(ConfigError, match=r"rl.runs\[0\].reward"):
        validate(cfg)
