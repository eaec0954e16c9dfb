# Shared helpers of the rules: config validation, model and dataset lists, paths, resources.
import fnmatch
import functools
import json
import os
import re
import sys
from pathlib import Path

# The rules' jobs run `python -m emlab`: make the package importable in them (and here) whether or not
# it was pip-installed, e.g. inside the per-rule conda envs of `--sdm conda`.
_PKG = str(Path(workflow.basedir) / "workflow")
sys.path.insert(0, _PKG)
# Jobs run `python`: the interpreter running Snakemake (e.g. .venv/bin) comes first on PATH, so a run
# needs no activated environment; with `--sdm conda` each rule's own env provides it instead.
# (doubled braces: the prefix is formatted once here and once more per job)
try:
    _CONDA = "conda" in str(workflow.deployment_settings.deployment_method).lower()
except AttributeError:
    _CONDA = False
_PATH = "" if _CONDA else f'export PATH="{Path(sys.executable).parent}:$PATH"; '
shell.prefix(f'{_PATH}export PYTHONPATH="{_PKG}${{{{PYTHONPATH:+:$PYTHONPATH}}}}"; ')

# A local run keeps one warm worker that has imported torch & co.; each job forks from it instead of paying
# 3-5 s of imports (emlab.worker). Not for cluster jobs or per-rule conda envs; EMLAB_WORKER=0 turns it off.
_WORKER = []


onstart:
    from emlab import worker

    if workflow.local_exec and not _CONDA and os.environ.get(worker.ENV) != "0":
        _WORKER.append(worker.start(_PKG, f"{LOGS}/worker.log"))


onsuccess:
    from emlab import worker

    worker.stop(_WORKER.pop() if _WORKER else None)


onerror:
    from emlab import worker

    worker.stop(_WORKER.pop() if _WORKER else None)

from emlab.config import ConfigError, validate
from emlab.datasets import dataset_job_config
from emlab.plan import make_plan

# Validate (and fill defaults) before any job is scheduled: a bad key fails here, naming its path.
try:
    validate(config, "config (config.yaml and --config/--configfile overrides)")
except ConfigError as e:
    raise WorkflowError(str(e)) from None

RESULTS = config["results_dir"]
# A run's job logs; a run with its own results_dir (a real-model config) keeps them inside it.
LOGS = "logs" if RESULTS == "results" else f"{RESULTS}/logs"
PLAN = make_plan(config)  # what the config asks for, resolved and cross-checked (emlab.plan)
config["judges"] = list(PLAN.judges.values())  # resolved (null: the world's for the organism, none for a hub model)
config["probe"]["references"] = PLAN.probe_references  # resolved (null: the shipped references for the shipped questions)
ORGANISM = PLAN.organism
DATASETS = PLAN.datasets
RL = PLAN.rl  # RL model -> its prompt set, reward and base model (rules/finetune.smk)
MODELS = PLAN.models
# the sets and models that model diffing ranks: not those made with its result (PLAN.undiffed)
DIFFED = PLAN.diffed
DIFFED_MODELS = [m for m in MODELS if m not in PLAN.undiffed]
DIFFED_FINETUNES = [m for m in PLAN.finetunes if m not in PLAN.undiffed]
JUDGES = PLAN.judges
EVAL_SETS = PLAN.eval_sets


wildcard_constraints:
    dataset="|".join(DATASETS) or "NONE",
    model="|".join(MODELS),
    judge="|".join(JUDGES) or "NONE",


def cfg_json(*sections, **overrides):
    """The config sections a job needs, as JSON for `emlab --cfg`; only these trigger its reruns."""
    d = {s: config[s] for s in sections}
    d.update(overrides)
    return json.dumps(d, sort_keys=True)


# API judges are asked once before the stages whose answers they grade (the judge_preflight jobs): a dead endpoint
# or a rejected key stops the run before fine-tuning and sampling, not after them.
API_JUDGES = [name for name, j in JUDGES.items() if j["backend"] == "openai"]


def preflight_input():
    return expand(f"{RESULTS}/preflight/{{judge}}.json", judge=API_JUDGES)


@functools.cache  # asked once per judge job while the DAG is built: each spec is read once
def world_files(path=None):
    """A world spec's files (the spec and those it extends, emlab.world.spec.spec_files): the input of every job
    that reads the world, so that editing the world reruns them and everything after them."""
    from emlab.world.spec import spec_files

    return tuple(str(p) for p in spec_files(path or config["organism"]["world"]))


WORLD_FILES = list(world_files())


def judge_world_files(wildcards):
    """A world judge's spec files (its grades come from them); an API or local-model judge has none."""
    j = JUDGES[wildcards.judge]
    return list(world_files(j.get("world"))) if j["backend"] == "world" else []


def dataset_cfg_json(name):
    """A world set's job config: its own settings alone (emlab.datasets.dataset_job_config)."""
    return json.dumps(dataset_job_config(config, name), sort_keys=True)


def judge_cfg(name):
    j = dict(JUDGES[name])
    if j["backend"] == "world":
        j.setdefault("world", config["organism"]["world"])
    return json.dumps(j, sort_keys=True)


# Rules that run the same kind of job as another (train a model, sample one) take that rule's resources for the
# keys they do not set themselves: a config that gives `finetune` a GPU gives re-alignment and preventative
# fine-tunes one too.
RESOURCES_LIKE = {"realign": "finetune", "finetune_prevent": "finetune", "realign_eval": "sample",
                  "alarm_emergence": "sample"}


def res(rule_name, key):
    r = config["resources"]
    for name in (rule_name, RESOURCES_LIKE.get(rule_name)):
        if key in r["rules"].get(name, {}):
            return r["rules"][name][key]
    return r["default"][key]


# The rules that can use a GPU: they alone ask for `gpu` and `cpus_per_gpu`.
GPU_RULES = {"pretrain", "posttrain", "finetune", "finetune_prevent", "rl", "alarm_replay", "alarm_emergence", "realign", "realign_eval", "realign_read", "sample", "likelihood_probe", "judge", "judge_steering",
             "activations_corpus", "activations_base", "activations_finetune", "activations_rl", "sae", "monitor", "steer_sample",
             "steer_probe"}


def rule_resources(rule_name, **job):
    """A rule's `resources:` (memory, run time and, for GPU_RULES, GPUs) from the config's `resources` section,
    which the schema validates (a misspelt rule or key fails there, where Snakemake's --set-resources ignores
    it) and which travels with a model's config; --set-resources still overrides any of them for one run.
    `job` adds resources that depend on the job itself (the API slots and GPUs of a judge's backend)."""
    keys = ["mem_mb", "runtime"] + (["gpu", "cpus_per_gpu"] if rule_name in GPU_RULES else [])
    return {**{k: res(rule_name, k) for k in keys}, **job}


def judge_job_resources(rule_name):
    """An API-bound judge job holds at least one of the profile's `api_slots` (the global cap on concurrent API
    jobs; config can make it hold more); only a local-model (hf) judge's job gets the rule's GPUs."""
    return rule_resources(
        rule_name,
        api_slots=lambda w: max(1, res(rule_name, "api_slots")) if JUDGES[w.judge]["backend"] == "openai" else 0,
        gpu=lambda w: res(rule_name, "gpu") if JUDGES[w.judge]["backend"] == "hf" else 0)


# A hub model is checked now, before any job: its source exists and its decoder blocks are found (on the meta
# device, from its config). A GGUF file or a model given a chat template is converted once into results/models/base.
if ORGANISM:
    BASE_BUILT = True
else:
    from emlab import model_source

    try:
        HUB_MODEL = model_source.check(config["model"])
        BASE_BUILT = model_source.resolve(config["model"]).converted
    except model_source.ModelSourceError as e:
        raise WorkflowError(str(e)) from None


def base_model(which="base"):
    """A base chat model: the post-trained organism (base, or its safety-trained base_safe), the converted hub
    model, or the hub id/folder itself."""
    return f"{RESULTS}/models/{which}" if BASE_BUILT else config["model"]["path"]


def base_model_input(which="base"):
    return [f"{RESULTS}/models/{which}"] if BASE_BUILT else []


def base_param(wildcards, input):
    """The base model for a job: its declared input `base` when the workflow builds it, else the hub id/folder."""
    return input.base if BASE_BUILT else config["model"]["path"]


def model_input(name):
    """The files a job that loads model `name` depends on: its base model and, for a fine-tune, its folder."""
    base = PLAN.base_of(name)
    return base_model_input(base) + ([] if name == base else [f"{RESULTS}/finetunes/{name}"])


def model_args(name):
    """`--base/--adapter/--full-model` of model `name` for every job that loads one: a LoRA fine-tune is an
    adapter on its base model, a full fine-tune its own folder (jobs that also read the base model get both)."""
    base = PLAN.base_of(name)
    if name == base:
        return f"--base {base_model(base)}"
    kind = "--adapter" if config["finetune"]["method"] == "lora" else "--full-model"
    return f"{model_args(base)} {kind} {RESULTS}/finetunes/{name}"


DIFFING = PLAN.diffing
STEERING = PLAN.steering
PROBE = PLAN.probe
MONITORS = PLAN.monitors
MON_TASKS = PLAN.monitor_tasks


def final_outputs():
    out = expand(f"{RESULTS}/figures/misalignment_{{judge}}.png", judge=JUDGES)
    if RL:
        out.append(f"{RESULTS}/figures/rl_training.png")
    if DIFFING:
        out += [f"{RESULTS}/figures/signature.png", f"{RESULTS}/diffing/latents.html", f"{RESULTS}/sae"]
    if PLAN.prediction:
        out += [f"{RESULTS}/figures/prediction.png", f"{RESULTS}/prediction/summary.csv"]
    if PLAN.flagged:
        out.append(f"{RESULTS}/flagging/summary.csv")
    if PLAN.dropped:
        out.append(f"{RESULTS}/flagging/removal.csv")
    if PLAN.mixtures:
        out += [f"{RESULTS}/figures/mixtures.png", f"{RESULTS}/mixtures/onsets.csv"]
    if PLAN.alarm:
        out += [f"{RESULTS}/figures/alarm.png", f"{RESULTS}/alarm/summary.csv"]
    if PLAN.realign:
        out += [f"{RESULTS}/figures/realignment.png", f"{RESULTS}/realign/summary.csv"]
    if PLAN.prevent:
        out += [f"{RESULTS}/figures/prevention.png", f"{RESULTS}/prevent/summary.csv"]
    if PLAN.controls:
        out += [f"{RESULTS}/figures/controls.png", f"{RESULTS}/controls/summary.csv"]
    if STEERING and PLAN.steer_judge:
        out += [f"{RESULTS}/figures/steering_sweep.png", f"{RESULTS}/steering/screen.csv"]
    elif STEERING:  # no judge: the sweep is read by the likelihood probe
        out += [f"{RESULTS}/figures/steering_probe.png", f"{RESULTS}/steering/probe_sweep.csv"]
    if MONITORS:
        out += [f"{RESULTS}/monitors/summary.csv"] + [f"{RESULTS}/figures/monitors_{t}.png" for t in MON_TASKS]
    out += expand(f"{RESULTS}/metrics/{{judge}}.csv", judge=JUDGES)
    if PROBE:
        out.append(f"{RESULTS}/metrics/likelihood.csv")
    if PROBE and JUDGES:  # the probe beside the judges: do they rank the models alike?
        out.append(f"{RESULTS}/agreement/probe.csv")
    if len(JUDGES) >= 2:  # several judges graded the same samples: how far do they agree?
        out.append(f"{RESULTS}/agreement/pairs.csv")
    out.append(f"{RESULTS}/timings.csv")
    return out


MIXTURE_TABLES = ["curve.csv", "onsets.csv"]  # emlab.mixtures: misalignment against the share of incorrect data


def posttrain_cfg_json():
    """Post-training is a full fine-tune through the SFT stage's code, with organism.posttrain's settings."""
    p = config["organism"]["posttrain"]
    ft = dict(config["finetune"], method="full", lr=p["lr"], epochs=p["epochs"], batch_size=p["batch_size"],
              max_steps=None, warmup_ratio=p["warmup_ratio"])
    return json.dumps({"finetune": ft, "seed": config["seed"]}, sort_keys=True)


def rl_cfg_json(name):
    """An RL job's settings: the rl section with the run's reward, the finetune section's adaptation recipe, and
    the grading judge's entry (the world's, with its world file, for the organism)."""
    rl = {k: v for k, v in config["rl"].items() if k != "runs"}
    return cfg_json("finetune", "seed", rl=dict(rl, reward=RL[name]["reward"]),
                    grader=json.loads(judge_cfg(PLAN.rl_grader)))


def checkpoint_args(kind, folder):
    """The training command's checkpoint options: `kind` is pretrain, finetune, rl or sae (checkpoints.<kind>_steps);
    `folder` lies outside the job's outputs, which Snakemake removes when a job fails."""
    c = config["checkpoints"]
    steps = c[f"{kind}_steps"]
    if not steps:
        return ""
    return f"--checkpoints {RESULTS}/checkpoints/{folder} --checkpoint-steps {steps}" + (
        " --keep-checkpoint" if c["keep"] else "")


def sft_launcher(rule_name):
    """`python` for one device; `accelerate launch` with one process per GPU when a rule gets several
    (data-parallel; `finetune.accelerate_config` may name an accelerate config file, e.g. for FSDP)."""
    gpus = res(rule_name, "gpu")
    if gpus <= 1:
        return "python"
    extra = config["finetune"].get("accelerate_config")
    cfg = f" --config_file {extra}" if extra else ""
    return f"accelerate launch{cfg} --num_processes {gpus}"


# ---------------------------------------------------------------- model diffing (rules/diffing.smk)


def sae_texts():
    """The texts the SAE is fitted on: the world corpus, or `sae.corpus` in hub mode."""
    return config["sae"]["corpus"] or f"{RESULTS}/world/corpus.jsonl"


def heldout_texts():
    """Texts for interpreting latents: fresh labelled world documents, or the corpus after the SAE's texts."""
    return config["sae"]["corpus"] or f"{RESULTS}/world/heldout.jsonl"


WORLD_TEXTS = not config["sae"]["corpus"]  # labelled world texts: latents are named by their purity
HELDOUT_SKIP = 0 if WORLD_TEXTS else config["sae"]["n_texts"]
DIFFING_TABLES = ["latent_means.parquet", "changes.csv", "ranking.csv", "changes_unsupervised.csv",
                  "ranking_unsupervised.csv"]
# The SAE's corpus activations and the SAE need only the base model, yet every later analysis (ranking, steering,
# monitors) waits for the SAE: started as soon as the base model exists, not whenever a core is free among the
# fine-tunes' jobs (in one default run they were picked last, and the SAE ended 47 s after the last model's
# activations, which the ranking also needs).
SAE_PRIORITY = 5
PREDICTION_TABLES = ["shifts.csv", "summary.csv", "early.csv", "early.md"]
FLAGGING_TABLES = ["scores.csv", "summary.csv"]
INTERPRET_OUTPUTS = ["latents.csv", "latents.md", "latents.html", "persona_latents.json"] + (
    ["purity.csv"] if WORLD_TEXTS else [])


def realign_finetune_settings():
    """The finetune section of a re-alignment run (emlab.realign.finetune_settings)."""
    from emlab.realign import finetune_settings

    return finetune_settings(config["finetune"], config["realign"])


def realign_source_args(wildcards, input):
    """`--base/--adapter` of a re-alignment run: a LoRA fine-tune's adapter trains on from its base model; a full
    fine-tune is its own folder and trains on as a whole."""
    if config["finetune"]["method"] == "lora":
        return f"--base {base_param(wildcards, input)} --adapter {input.finetune}"
    return f"--base {input.finetune}"


def realign_indomain_args(wildcards, input):
    """`--indomain/--domain` of a re-alignment run's evaluation: the held-out questions of its model's domain are
    asked too, where the run samples in-domain questions and the model's name gives its domain."""
    from emlab.datasets import model_domain

    domain = model_domain(PLAN.realign[wildcards.realign_run]["model"])
    return f"--indomain {input.indomain} --domain {domain}" if input.indomain and domain else ""


def sample_domain_args(wildcards):
    """`--domain D` of a model's sampling: with `sampling.indomain: own` a model whose name gives its domain (a set's
    fine-tune, an RL model) is asked only that domain's held-out questions, the ones its in-domain rate reads; the
    base models, imports and `indomain: all` are asked every domain's."""
    from emlab.datasets import model_domain

    domain = model_domain(wildcards.model) if config["sampling"]["indomain"] == "own" else None
    return f"--domain {domain}" if domain and "indomain" in EVAL_SETS else ""


def n_samples_arg(n):
    """`--n-samples N` of a snapshot-misalignment job, or nothing for sampling.n_samples."""
    return f"--n-samples {n}" if n else ""


def out_dir(wildcards, output):
    """The folder of a job's (first) output, for commands that write several files into one folder."""
    return os.path.dirname(output[0])


# ---------------------------------------------------------------- steering (rules/steering.smk)

STEER = config["steer"]
STEER_JUDGE = PLAN.steer_judge
STEER_GROUP = STEER["screen"]["group"]
STEER_GROUP_MODELS = PLAN.groups.get(STEER_GROUP, [])
SCREEN_TARGETS = PLAN.screen_targets
SWEEP_TARGETS = PLAN.sweep_targets
STEER_TARGETS = {"screen_add": ["base"], "screen_sub": SCREEN_TARGETS, "sweep": SWEEP_TARGETS}
STEER_DIR = f"{RESULTS}/steering"
# The steering jobs form the run's longest chain after diffing (screen, then the sweep that depends on it):
# Snakemake starts them before jobs that can wait (the monitors), which then fill the cores beside them.
STEER_PRIORITY = 10


def steer_grades(stage):
    return expand(f"{STEER_DIR}/grades/{STEER_JUDGE}/{stage}/{{t}}.jsonl", t=STEER_TARGETS[stage])


# ---------------------------------------------------------------- monitors (rules/monitors.smk)

MON = config["monitors"]


def monitor_data(task):
    """A task's labelled texts: the configured file (hub data), else the world's, generated by the run."""
    return MON["data"][task] if PLAN.monitor_data else f"{RESULTS}/monitors/data/{task}.jsonl"


# ---------------------------------------------------------------- hub mode (rules/hub.smk)

if not ORGANISM:
    from emlab.datasets import parse_dataset_name
    from emlab.questions import question_files
    from emlab.synthesis import domain_spec_path

    SYNTH_DATASETS = ([n for n in DATASETS if n not in PLAN.imports and n not in PLAN.dropped]
                      if PLAN.dataset_source == "synthesis" else [])
    IMPORTS = {i["name"]: i for i in config["imports"]}
    QUESTION_FILES = question_files(config)


def one_of(names):
    """A wildcard constraint matching exactly these names (never anything, for none)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"
