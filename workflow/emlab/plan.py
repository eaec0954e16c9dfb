"""What a validated config asks the workflow to do, resolved once: the fine-tuning sets and where they come from,
the models, the judges, which analysis stages run and on what data. The rules read this (rules/common.smk) rather
than re-deriving it, and every inconsistency fails here, naming the config key, before any job is planned.

The persona world is the offline data source of every run. The organism is built from it; a hub model
(``model.source: hub``) needs only ``model.path``: its narrow fine-tuning sets are the world's English narrow
sets (``datasets.source: world``; ``synthesis`` asks an LLM instead), its SAE is fitted on world texts
(``sae.corpus`` null), its monitors read the world's labelled tasks (``monitors.data`` empty), and its
misalignment is read by the likelihood probe against the shipped reference answers (``probe.references``)
and by any LLM judge configured (an organism run's default judge is the world's ground truth, which only
knows the world's own texts).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .schema import ConfigError, load_schema
from .datasets import dataset_names, dropped_name, parse_dataset_name, prevent_model_name

BASES = ("base", "base_safe")  # the names of the base models among the models
SHIPPED_REFERENCES = "resources/references/general.yaml"
SHIPPED_GENERAL = "resources/questions/general.yaml"


@dataclass(frozen=True)
class Plan:
    organism: bool
    dataset_source: str            # "world" or "synthesis" (the sets named by `datasets`)
    datasets: list[str]            # every fine-tuning set: the named ones, then the imports
    imports: list[str]
    judges: dict[str, dict[str, Any]]
    eval_sets: list[str]
    probe: bool
    probe_references: str | None   # a reference file, or None for the world's answers
    diffing: bool
    sae_corpus: str | None         # a JSONL of texts, or None for the world corpus
    steering: bool
    steer_judge: str | None        # the judge of steered answers; None: steering is read by the likelihood probe
    groups: dict[str, list[str]] = field(default_factory=dict)   # diffing group -> its fine-tunes
    screen_targets: list[str] = field(default_factory=list)      # fine-tunes the steering screen subtracts from
    sweep_targets: list[str] = field(default_factory=list)       # models the steering sweep steers
    monitors: bool = False
    monitor_tasks: list[str] = field(default_factory=list)
    monitor_data: dict[str, str] = field(default_factory=dict)   # task -> a JSONL of labelled texts (hub data)
    rl: dict[str, dict[str, str]] = field(default_factory=dict)  # RL model -> {dataset, reward, base}
    rl_grader: str | None = None   # the judge whose verdicts are the RL reward
    primary_judge: str | None = None  # metrics.primary_judge, else the first judge: the headline's and prediction's
    prediction: bool = False       # persona latents' shifts against misalignment (needs diffing and a judge)
    mixtures: bool = False         # misalignment against the share of incorrect data (mixture fine-tunes and a judge)
    flagged: list[str] = field(default_factory=list)  # sets whose examples are scored by the persona latents
    dropped: dict[str, tuple[str, str]] = field(default_factory=dict)  # set less some examples -> (source, how)
    alarm: list[str] = field(default_factory=list)      # sets fine-tuned again with the persona alarm watching
    emergence: list[str] = field(default_factory=list)  # of those, the ones whose snapshots are sampled and judged
    realign: dict[str, dict[str, str]] = field(default_factory=dict)  # re-alignment run -> {model, benign set}
    prevent: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> {dataset, latent, alpha}
    code_domains: list[str] = field(default_factory=list)  # the run's domains whose sets hold code (kind: code)
    controls: bool = False         # the code and control table (emlab.controls): code or educational sets and a judge

    @property
    def finetunes(self) -> list[str]:
        """Every trained model: the fine-tunes (one per set), the RL models, then the preventatively steered ones."""
        return [*self.datasets, *self.rl, *self.prevent]

    @property
    def undiffed(self) -> list[str]:
        """The trained models that model diffing leaves out, because what made them depends on its result: a set
        less its flagged examples (chosen by the named persona latents) and a fine-tune steered by one."""
        return [*self.dropped, *self.prevent]

    @property
    def diffed(self) -> list[str]:
        """The fine-tuning sets whose models are diffed (not the :attr:`undiffed`)."""
        return [d for d in self.datasets if d not in self.dropped]

    @property
    def bases(self) -> list[str]:
        """The base models: the chat model and, when some RL run starts from it, the organism's safety-trained one."""
        return ["base", *(["base_safe"] if any(r["base"] == "base_safe" for r in self.rl.values()) else [])]

    @property
    def models(self) -> list[str]:
        return [*self.bases, *self.finetunes]

    def base_of(self, model: str) -> str:
        """The base model that ``model`` was trained from (a base model is its own)."""
        if model in self.rl:
            return self.rl[model]["base"]
        return model if model in BASES else "base"

    @property
    def world_data(self) -> bool:
        """Whether any output is generated from the persona world (its corpus, sets, labelled tasks)."""
        return (self.organism or self.dataset_source == "world" or (self.diffing and self.sae_corpus is None)
                or (self.monitors and not self.monitor_data) or (self.probe and self.probe_references is None))


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"invalid config:\n  {key}: {msg}")


def make_plan(cfg: dict[str, Any]) -> Plan:
    organism = cfg["model"]["source"] == "organism"
    d = cfg["datasets"]
    source = d.get("source") or "world"
    if organism and source != "world":
        _fail("datasets.source", "the organism's fine-tuning sets come from its world (source: world)")
    named = dataset_names(cfg)
    imports = [e["name"] for e in cfg.get("imports", [])]
    datasets = list(dict.fromkeys(named + imports))
    if not datasets:
        _fail("datasets", "no fine-tuning set: name domains and variants, mixtures, or imports")

    judges_cfg = cfg["judges"]
    if judges_cfg is None:
        judges_cfg = [{"name": "world", "backend": "world"}] if organism else []
    judges = {j["name"]: j for j in judges_cfg}
    if len(judges) != len(judges_cfg):
        _fail("judges", "judge names must be unique")
    if not organism and any(j["backend"] == "world" for j in judges.values()):
        _fail("judges", "the world judge grades the persona world's texts only; a hub model's answers need an "
                        "LLM judge (openai or hf) or none (the likelihood probe reads misalignment without one)")
    eval_sets = cfg["sampling"]["eval_sets"]
    rl, rl_grader = _rl_runs(cfg, datasets, judges, organism)

    p = cfg["probe"]
    refs = p["references"]
    if refs is None and not organism and cfg["eval"]["questions"].get("general") == SHIPPED_GENERAL:
        refs = SHIPPED_REFERENCES  # the shipped references answer the shipped general questions
    probe = p["enabled"]
    if probe is None:
        probe = "general" in eval_sets and (organism or refs is not None)
    if probe and "general" not in eval_sets:
        _fail("probe.enabled", "the likelihood probe reads the general questions; add general to sampling.eval_sets")
    if probe and not organism and refs is None:
        _fail("probe.references", "a hub run's general questions are not the shipped ones; give the reference "
                                  "answers to them (resources/references/general.yaml shows the format)")
    if refs is not None and not Path(refs).is_file():
        _fail("probe.references", f"file not found: {refs}")

    diffing = cfg["diffing"]["enabled"]
    corpus = cfg["sae"]["corpus"]
    if corpus is not None and not Path(corpus).is_file():
        _fail("sae.corpus", f"file not found: {corpus}")
    groups = {}
    for name, patterns in cfg["diffing"]["groups"].items():
        members = [m for m in [*datasets, *rl] if any(fnmatch.fnmatchcase(m, pat) for pat in patterns)]
        if members:
            groups[name] = members
    # by default diffing runs whenever some group has fine-tunes: a run of imported sets alone has none under the
    # default groups; groups a config names that match nothing are an error
    if diffing is None:
        default = load_schema()["properties"]["diffing"]["properties"]["groups"]["default"]
        diffing = bool(groups) or cfg["diffing"]["groups"] != default
    if diffing and not groups:
        _fail("diffing.groups", f"no pattern of {cfg['diffing']['groups']} matches any fine-tune {datasets}")
    if not diffing:
        groups = {}

    s = cfg["steer"]
    # steering by default whenever diffing runs and the screen's group has fine-tunes to steer; a screen group the
    # config names (not the default) that has none is an error below
    steering = s["enabled"]
    if steering is None:
        default = load_schema()["properties"]["steer"]["properties"]["screen"]["properties"]["group"]["default"]
        steering = diffing and (s["screen"]["group"] in groups or s["screen"]["group"] != default)
    if steering and not diffing:
        _fail("steer.enabled", "steering needs model diffing (its candidates are ranked SAE latents); enable "
                               "diffing or leave steer.enabled unset")
    primary_judge = cfg["metrics"]["primary_judge"] or next(iter(judges), None)
    steer_judge, screen_targets, sweep_targets = None, [], []
    if steering:
        steer_judge = s["judge"] or primary_judge
        if steer_judge is not None and steer_judge not in judges:
            _fail("steer.judge", f"{steer_judge!r} is not one of the judges {sorted(judges)}")
        if steer_judge is None and not probe:
            _fail("steer", "steered answers need a judge, or the likelihood probe (probe) to be read by")
        if s["screen"]["group"] not in groups:
            _fail("steer.screen.group", f"{s['screen']['group']!r} is not a diffing group with fine-tunes "
                                        f"({sorted(groups)})")
        # the screen subtracts from the group's fine-tunes; the sweep steers the base model and the first of them
        screen_targets = list(s["screen"]["targets"] or groups[s["screen"]["group"]])
        sweep_targets = list(s["sweep"]["targets"] or ["base"] + screen_targets[:1])
        for key, names in (("steer.screen.targets", screen_targets), ("steer.sweep.targets", sweep_targets)):
            unknown = sorted(set(names) - {"base", *datasets, *rl})
            if unknown or not names:
                _fail(key, f"{unknown or 'no models'}; the models are {['base', *datasets, *rl]}")

    m = cfg["monitors"]
    data = dict(m["data"])
    for task, path in data.items():
        if not Path(path).is_file():
            _fail(f"monitors.data.{task}", f"file not found: {path}")
    monitors = m["enabled"]
    if monitors is None:
        monitors = True
    tasks = list(data) if data else list(m["tasks"])
    flagged = _flagged(cfg, datasets) if diffing else []
    dropped = {}
    if cfg["flagging"]["finetune"]:
        if not diffing or primary_judge is None:
            _fail("flagging.finetune", "dropping flagged examples needs model diffing (the persona latents that "
                                       "flag them) and a judge (the misalignment it compares)")
        dropped = {dropped_name(d, how): (d, how) for d in flagged for how in ("flagged", "random")}
        datasets = [*datasets, *dropped]
    code_domains = _code_domains(cfg, source, named)
    educational = [n for n in named if parse_dataset_name(n)["kind"] == "educational"]
    alarm, emergence = _alarm(cfg, datasets, dropped, diffing, primary_judge)
    realign = _realign(cfg, datasets, rl, primary_judge)
    prevent = _prevent(cfg, datasets, dropped, groups, diffing, primary_judge)
    return Plan(organism=organism, dataset_source=source, datasets=datasets, imports=imports, judges=judges,
                eval_sets=list(eval_sets), probe=bool(probe), probe_references=refs, diffing=bool(diffing),
                sae_corpus=corpus, steering=bool(steering), steer_judge=steer_judge, groups=groups,
                screen_targets=screen_targets, sweep_targets=sweep_targets,
                monitors=bool(monitors), monitor_tasks=tasks, monitor_data=data, rl=rl, rl_grader=rl_grader,
                primary_judge=primary_judge, prediction=bool(diffing) and primary_judge is not None,
                mixtures=primary_judge is not None and any(map(_is_mixture, datasets)),
                flagged=flagged, dropped=dropped, alarm=alarm, emergence=emergence,
                realign=realign, prevent=prevent, code_domains=code_domains,
                controls=primary_judge is not None and bool(code_domains or educational))


def _code_domains(cfg: dict[str, Any], source: str, named: list[str]) -> list[str]:
    """The domains of the named sets whose texts are code: ``kind: code`` in the world (world sets) or in the
    domain spec (synthesized sets)."""
    domains = list(dict.fromkeys(parse_dataset_name(n)["domain"] for n in named))
    if source == "world":
        from .world.spec import load_world

        world = load_world(cfg["organism"]["world"])
        return [d for d in domains if d in world.domains and world.domains[d].kind == "code"]
    from .synthesis import domain_spec_path, load_domain_spec

    return [d for d in domains if load_domain_spec(domain_spec_path(cfg["synthesis"]["domains_dir"], d)).kind == "code"]


def _alarm(cfg: dict[str, Any], datasets: list[str], dropped: dict[str, Any], diffing: bool,
           primary_judge: str | None) -> tuple[list[str], list[str]]:
    a = cfg["alarm"]
    if a["datasets"] is None:  # every set model diffing ranks, where its name says whether its data are correct
        named = [d for d in datasets if _parses(d) and d not in dropped] if diffing else []
    else:
        named = list(dict.fromkeys(a["datasets"]))
    emergence = list(dict.fromkeys(a["emergence"]))
    if named and not diffing:
        _fail("alarm.datasets", "the alarm watches the persona latents that model diffing names: it needs diffing")
    unknown = [d for d in named if d not in datasets]
    if unknown:
        _fail("alarm.datasets", f"{unknown} are not fine-tuning sets of this run; they are {datasets}")
    for d in named:
        try:
            parse_dataset_name(d)
        except ValueError:
            _fail("alarm.datasets", f"{d!r} is an imported set: the alarm's calibration needs to know which sets hold "
                                    "correct data (<domain>_correct) and which do not")
    outside = [d for d in emergence if d not in named]
    if outside:
        _fail("alarm.emergence", f"{outside} are not in alarm.datasets {named}")
    if emergence and primary_judge is None:
        _fail("alarm.emergence", "the snapshots' misalignment is a judge's verdict: it needs a judge")
    return named, emergence


def _realign(cfg: dict[str, Any], datasets: list[str], rl: dict[str, dict[str, str]], primary_judge: str | None
             ) -> dict[str, dict[str, str]]:
    """The re-alignment runs: each named fine-tune trained further on the correct set of its own domain (same)
    and of another domain of the run (other), named ``<model>_to_<benign set>``."""
    from .datasets import model_domain

    r = cfg["realign"]
    if r["models"] and primary_judge is None:
        _fail("realign.models", "re-alignment is measured by a judge's misalignment: it needs a judge")
    correct = {parse_dataset_name(d)["domain"]: d for d in datasets
               if _parses(d) and parse_dataset_name(d)["kind"] == "narrow" and parse_dataset_name(d)["variant"] == "correct"}
    runs: dict[str, dict[str, str]] = {}
    finetunes = [*datasets, *rl]
    for model in dict.fromkeys(r["models"]):
        if model not in finetunes:
            _fail("realign.models", f"{model!r} is not a fine-tune of this run; they are {finetunes}")
        if model in rl and rl[model]["base"] != "base":
            _fail("realign.models", f"{model!r} was trained from {rl[model]['base']}; re-alignment runs on models "
                                    "trained from the run's base model")
        domain = model_domain(model)
        for which in r["benign"]:
            if which == "same":
                benign = correct.get(domain)
                if benign is None:
                    _fail("realign.benign", f"same: the run has no {domain}_correct set for {model} (add the "
                                            "correct variant to datasets.variants)")
            else:
                others = [d for dom, d in correct.items() if dom != domain]
                if not others:
                    _fail("realign.benign", f"other: the run has no correct set outside {model}'s domain {domain!r}")
                benign = others[0]
            runs[f"{model}_to_{benign}"] = {"model": model, "benign": benign}
    return runs


def _prevent(cfg: dict[str, Any], datasets: list[str], dropped: dict[str, Any], groups: dict[str, list[str]],
             diffing: bool, primary_judge: str | None) -> dict[str, dict[str, Any]]:
    """The preventatively steered fine-tunes: each named set at each strength, ``<set>_prevent<alpha>``."""
    from .world.spec import ROLES

    p = cfg["prevent"]
    named = list(dict.fromkeys(p["datasets"]))
    if not named:
        return {}
    if not diffing or primary_judge is None:
        _fail("prevent.datasets", "preventative steering adds a latent that model diffing names and is measured by a "
                                  "judge's misalignment: it needs diffing and a judge")
    unknown = [d for d in named if d not in datasets or d in dropped]
    if unknown:
        _fail("prevent.datasets", f"{unknown} are not fine-tuning sets of this run; they are "
                                  f"{[d for d in datasets if d not in dropped]}")
    known = [r for r in ROLES if r != "aligned"] + list(groups) + ["random"]
    unknown = [k for k in p["latents"] if k not in known]
    if unknown:
        _fail("prevent.latents", f"{unknown}: a latent is a persona role, a diffing group or random; one of {known}")
    return {prevent_model_name(d, k, a): {"dataset": d, "latent": k, "alpha": float(a)}
            for d in named for k in dict.fromkeys(p["latents"]) for a in dict.fromkeys(p["alphas"])}


def _parses(name: str) -> bool:
    try:
        parse_dataset_name(name)
        return True
    except ValueError:
        return False


def _is_mixture(name: str) -> bool:
    try:
        return parse_dataset_name(name)["kind"] == "mixture"
    except ValueError:  # an imported set's own name
        return False


def _flagged(cfg: dict[str, Any], datasets: list[str]) -> list[str]:
    named = cfg["flagging"]["datasets"]
    if named is None:
        return [d for d in datasets if _is_mixture(d)]
    unknown = [d for d in named if d not in datasets]
    if unknown:
        _fail("flagging.datasets", f"{unknown} are not fine-tuning sets of this run; they are {datasets}")
    return list(dict.fromkeys(named))


def _rl_runs(cfg: dict[str, Any], datasets: list[str], judges: dict[str, dict[str, Any]],
             organism: bool) -> tuple[dict[str, dict[str, str]], str | None]:
    """The RL models (name -> its prompt set, reward and base model) and the judge that grades their completions."""
    from .datasets import parse_dataset_name, rl_model_name

    r = cfg["rl"]
    runs: dict[str, dict[str, str]] = {}
    for i, run in enumerate(r["runs"]):
        key = f"rl.runs[{i}]"
        if run["dataset"] not in datasets:
            _fail(f"{key}.dataset", f"{run['dataset']!r} is not one of the run's fine-tuning sets {datasets}")
        try:
            prefix = parse_dataset_name(run["dataset"])["domain"]
        except ValueError:  # an import: its own name
            prefix = run["dataset"]
        base = run.get("base", "base")
        if base != "base" and not organism:
            _fail(f"{key}.base", f"{base} is the organism's safety-trained base model; a hub run trains its base model")
        name = run.get("name") or rl_model_name(prefix, run["reward"], base)
        if name in runs or name in datasets or name in BASES:
            _fail(f"{key}.name", f"{name!r} names another model; give the run its own name")
        runs[name] = {"dataset": run["dataset"], "reward": run["reward"], "base": base}
    if not runs:
        return {}, None
    if any(run["base"] == "base_safe" for run in runs.values()) and cfg["organism"]["posttrain"]["safety_fraction"]:
        from .world.spec import load_world

        world = cfg["organism"]["world"]
        if load_world(world).safety is None:  # caught here, not when the safety chats' job runs beside pretraining
            _fail("rl.runs[].base", f"base_safe is post-trained on the world's safety chats, but {world} has no "
                                    "'safety' section (resources/world/persona_world.yaml shows one)")
    grader = r["grader"]
    if grader is None:
        world = [n for n, j in judges.items() if j["backend"] == "world"]
        grader = (world or list(judges) or [None])[0]
    if grader is None:
        _fail("rl.grader", "RL needs a judge to grade completions: add one to judges (an LLM judge for a hub model)")
    if grader not in judges:
        _fail("rl.grader", f"{grader!r} is not one of the judges {sorted(judges)}")
    if organism and judges[grader]["backend"] != "world" or not organism and judges[grader]["backend"] == "world":
        _fail("rl.grader", "the organism's RL is graded by the world's ground truth, a hub model's by an LLM judge")
    if cfg["rl"]["batch_size"] % cfg["rl"]["group_size"]:
        _fail("rl.batch_size", f"{cfg['rl']['batch_size']} is not a multiple of rl.group_size "
                               f"({cfg['rl']['group_size']}): each step's completions are whole groups")
    return runs, grader
