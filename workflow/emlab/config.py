"""Config loading and validation against ``workflow/schemas/config.schema.yaml``.

Validation fills in schema defaults and fails before any job starts, naming the key path
(e.g. ``finetune.lora.r``) and the reason. Snakefile and CLI both go through :func:`validate`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    pass


def _key_path(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<top level>"


def _with_defaults(validator_cls):
    """A validator that also fills ``default`` values of properties (the jsonschema FAQ recipe)."""
    from jsonschema import validators

    validate_props = validator_cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return validators.extend(validator_cls, {"properties": set_defaults})


def load_schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def validate(config: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Validate ``config`` in place (defaults filled in) and return it; raise ConfigError naming the key."""
    from jsonschema import Draft202012Validator

    schema = load_schema()
    validator = _with_defaults(Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.path), list(map(str, e.path))))
    if errors:
        lines = []
        for e in errors[:10]:
            if e.validator == "additionalProperties":
                known = sorted(e.schema.get("properties", {}))
                lines.append(f"  {_key_path(e.path)}: {e.message} (known keys: {', '.join(known)})")
            else:
                lines.append(f"  {_key_path(e.path)}: {e.message}")
        raise ConfigError(f"invalid {source}:\n" + "\n".join(lines))
    _check_semantics(config, source)
    return config


def _check_semantics(cfg: dict[str, Any], source: str) -> None:
    """Cross-key checks a JSON schema cannot express."""
    names = [j["name"] for j in cfg.get("judges", [])]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"invalid {source}:\n  judges: duplicate judge name(s) {dup}")
    primary = cfg.get("metrics", {}).get("primary_judge")
    if primary is not None and primary not in names:
        raise ConfigError(f"invalid {source}:\n  metrics.primary_judge: {primary!r} is not one of the judges {names}")
    from . import imports

    imports.check_config(cfg)
    _check_diffing(cfg, source)
    w = None
    if cfg["model"]["source"] == "organism":
        world = Path(cfg["organism"]["world"])
        if not world.exists():
            raise ConfigError(f"invalid {source}:\n  organism.world: file not found: {world}")
        from .world.spec import load_world

        w = load_world(world)
        for d in cfg["datasets"]["domains"] + cfg["datasets"]["mixtures"]["domains"]:
            if d not in w.domains:
                raise ConfigError(f"invalid {source}:\n  datasets: unknown domain {d!r}; {world} defines {sorted(w.domains)}")
        unknown = set(cfg["organism"]["corpus"]["persona_mix"]) - set(w.personas)
        if unknown:
            raise ConfigError(f"invalid {source}:\n  organism.corpus.persona_mix: unknown persona(s) {sorted(unknown)}; {world} defines {sorted(w.personas)}")
    else:
        if cfg["model"].get("path") is None:
            raise ConfigError(f"invalid {source}:\n  model.path: required when model.source is 'hub' (a hub id or a local folder)")
        # hub mode: domain specs for the synthesized sets, question files for the eval sets, LLM judges
        from . import questions, synthesis

        synthesis.check_config(cfg)
        questions.check_config(cfg)
        if any(j["backend"] == "world" for j in cfg["judges"]):
            raise ConfigError(f"invalid {source}:\n  judges: the 'world' judge grades the persona world's texts only; "
                              "with model.source: hub list openai or hf judges")
    _check_monitors(cfg, source, w)


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return validate(cfg, str(path))


def _check_diffing(cfg: dict[str, Any], source: str) -> None:
    """The SAE settings and, in hub mode, the texts the SAE is fitted on and latents are interpreted with."""
    from .sae.train import SAEConfigError, SAETrainConfig

    try:
        SAETrainConfig.from_dict(cfg["sae"]["train"], where="sae.train")
    except SAEConfigError as e:
        raise ConfigError(f"invalid {source}:\n  {e}") from None
    s, flag = cfg["sae"], cfg["diffing"]["enabled"]
    if cfg["model"]["source"] != "organism":
        wanted = flag or (flag is None and (s["corpus"] or s["pretrained"]))
        if wanted and not s["corpus"]:
            raise ConfigError(f"invalid {source}:\n  sae.corpus: required for model diffing in hub mode (a JSONL of "
                              "texts or chats to fit the SAE on and to interpret its latents with)")
    if s["corpus"] and not Path(s["corpus"]).exists():
        raise ConfigError(f"invalid {source}:\n  sae.corpus: file not found: {s['corpus']}")


def _check_monitors(cfg: dict[str, Any], source: str, world) -> None:
    """Every monitoring task has its question and, in hub mode, its labelled texts. ``world`` is the
    organism's loaded world spec (None in hub mode)."""
    m = cfg["monitors"]
    if world is not None:
        tasks = m["tasks"]
        unknown = [t for t in tasks if t not in world.monitoring and t not in m["questions"]]
        if unknown:
            raise ConfigError(f"invalid {source}:\n  monitors.tasks: {unknown} are not monitoring tasks of "
                              f"{cfg['organism']['world']} ({sorted(world.monitoring)}); give monitors.questions for them")
        return
    for task, path in m["data"].items():
        if not Path(path).exists():
            raise ConfigError(f"invalid {source}:\n  monitors.data.{task}: file not found: {path}")
        if task not in m["questions"]:
            raise ConfigError(f"invalid {source}:\n  monitors.questions.{task}: required in hub mode "
                              "(ask: the zero-shot Yes/No question; describe: the task description for prompted probes)")
