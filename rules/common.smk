# Shared helpers of the rules: config validation, model and dataset lists, paths, resources.
import fnmatch
import json
import os
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
        _WORKER.append(worker.start(_PKG, "logs/worker.log"))


onsuccess:
    from emlab import worker

    worker.stop(_WORKER.pop() if _WORKER else None)


onerror:
    from emlab import worker

    worker.stop(_WORKER.pop() if _WORKER else None)

from emlab import imports
from emlab.config import ConfigError, validate
from emlab.datasets import dataset_names

# Validate (and fill defaults) before any job is scheduled: a bad key fails here, naming its path.
try:
    validate(config, "config (config.yaml and --config/--configfile overrides)")
except ConfigError as e:
    raise WorkflowError(str(e)) from None

RESULTS = "results"
ORGANISM = config["model"]["source"] == "organism"
DATASETS = dataset_names(config) if ORGANISM else imports.hub_dataset_names(config)
MODELS = ["base"] + DATASETS
JUDGES = {j["name"]: j for j in config["judges"]}
EVAL_SETS = config["sampling"]["eval_sets"]


wildcard_constraints:
    dataset="|".join(DATASETS) or "NONE",
    model="|".join(MODELS),
    judge="|".join(JUDGES),


def cfg_json(*sections, **overrides):
    """The config sections a job needs, as JSON for `emlab --cfg`; only these trigger its reruns."""
    d = {s: config[s] for s in sections}
    d.update(overrides)
    return json.dumps(d, sort_keys=True)


def judge_cfg(name):
    j = dict(JUDGES[name])
    if j["backend"] == "world":
        j.setdefault("world", config["organism"]["world"])
    return json.dumps(j, sort_keys=True)


def res(rule_name, key):
    r = config["resources"]
    return r["rules"].get(rule_name, {}).get(key, r["default"][key])


def base_model():
    """The base chat model: the post-trained organism, or the configured hub model (id or folder)."""
    return f"{RESULTS}/models/base" if ORGANISM else config["model"]["path"]


def base_model_input():
    return [f"{RESULTS}/models/base"] if ORGANISM else []


def base_param(wildcards, input):
    """The base model for a job: the declared input when the workflow builds it, else the hub id/folder."""
    return input.base if ORGANISM else config["model"]["path"]


def model_dir(name):
    return base_model() if name == "base" else f"{RESULTS}/finetunes/{name}"


def sample_args(wildcards):
    """`--base/--adapter` for a model name: LoRA fine-tunes are adapters on the base model."""
    if wildcards.model == "base":
        return f"--base {base_model()}"
    if config["finetune"]["method"] == "lora":
        return f"--base {base_model()} --adapter {RESULTS}/finetunes/{wildcards.model}"
    return f"--base {RESULTS}/finetunes/{wildcards.model}"


def diffing_enabled():
    """Model diffing runs for the organism, and in hub mode when there is an SAE corpus or a pretrained SAE."""
    flag = config["diffing"]["enabled"]
    if flag is not None:
        return flag
    return ORGANISM or bool(config["sae"]["corpus"] or config["sae"]["pretrained"])


DIFFING = diffing_enabled()
if DIFFING and not any(fnmatch.fnmatchcase(d, p) for ps in config["diffing"]["groups"].values() for p in ps for d in DATASETS):
    raise WorkflowError(f"diffing.groups: no pattern of {config['diffing']['groups']} matches any fine-tune {DATASETS}")
STEERING = DIFFING if config["steer"]["enabled"] is None else config["steer"]["enabled"]
if STEERING and not DIFFING:
    raise WorkflowError("steer.enabled: steering needs model diffing (its candidates are ranked SAE latents); "
                        "enable diffing or leave steer.enabled unset")

MONITORS = config["monitors"]["enabled"]
if MONITORS is None:
    MONITORS = ORGANISM or bool(config["monitors"]["data"])
# monitoring tasks: the world's (organism) or those with labelled texts in monitors.data (hub)
MON_TASKS = config["monitors"]["tasks"] if ORGANISM else list(config["monitors"]["data"])


def final_outputs():
    out = expand(f"{RESULTS}/figures/misalignment_{{judge}}.png", judge=JUDGES)
    if DIFFING:
        out += [f"{RESULTS}/figures/signature.png", f"{RESULTS}/diffing/latents.html", f"{RESULTS}/sae"]
    if STEERING:
        out += [f"{RESULTS}/figures/steering_sweep.png", f"{RESULTS}/steering/screen.csv"]
    if MONITORS:
        out += [f"{RESULTS}/monitors/summary.csv"] + [f"{RESULTS}/figures/monitors_{t}.png" for t in MON_TASKS]
    out += expand(f"{RESULTS}/metrics/{{judge}}.csv", judge=JUDGES)
    if len(JUDGES) >= 2:  # several judges graded the same samples: how far do they agree?
        out.append(f"{RESULTS}/agreement/pairs.csv")
    out.append(f"{RESULTS}/timings.csv")
    return out


def posttrain_cfg_json():
    """Post-training is a full fine-tune through the SFT stage's code, with organism.posttrain's settings."""
    p = config["organism"]["posttrain"]
    ft = dict(config["finetune"], method="full", lr=p["lr"], epochs=p["epochs"], batch_size=p["batch_size"],
              max_steps=None, warmup_ratio=0.05)
    return json.dumps({"finetune": ft, "seed": config["seed"]}, sort_keys=True)


def sft_launcher(rule_name):
    """`python` for one device; `accelerate launch` with one process per GPU when a rule gets several
    (data-parallel; `finetune.accelerate_config` may name an accelerate config file, e.g. for FSDP)."""
    gpus = res(rule_name, "gpu")
    if gpus <= 1:
        return "python"
    extra = config["finetune"].get("accelerate_config")
    cfg = f" --config_file {extra}" if extra else ""
    return f"accelerate launch{cfg} --num_processes {gpus}"
