"""Config loading and validation against ``workflow/schemas/config.schema.yaml``.

Validation fills in schema defaults and fails before any job starts, naming the key path
(e.g. ``finetune.lora.r``) and the reason. Snakefile and CLI both go through :func:`validate`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from .io import parse_yaml
from .schema import ConfigError, load_schema


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


def section(name: str, values: dict[str, Any] | None, source: str | None = None) -> dict[str, Any]:
    """One top-level section (e.g. ``finetune``) validated against its part of the schema, defaults filled in: the
    settings a library caller passes to a stage get the same defaults and errors as the workflow's config."""
    from jsonschema import Draft202012Validator

    schema = load_schema()
    sub = {"type": "object", "properties": {name: schema["properties"][name]}, "$defs": schema.get("$defs", {})}
    doc = {name: copy.deepcopy(values) if values is not None else {}}
    errors = sorted(_with_defaults(Draft202012Validator)(sub).iter_errors(doc),
                    key=lambda e: (len(e.path), list(map(str, e.path))))
    if errors:
        raise ConfigError(f"invalid {source or name + ' settings'}:\n" + "\n".join(
            f"  {_key_path(e.path)}: {e.message}" for e in errors[:10]))
    return doc[name]


def _check_semantics(cfg: dict[str, Any], source: str) -> None:
    """Cross-key checks a JSON schema cannot express."""
    names = [j["name"] for j in cfg["judges"] or []]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"invalid {source}:\n  judges: duplicate judge name(s) {dup}")
    primary = cfg.get("metrics", {}).get("primary_judge")
    if primary is not None and primary not in names:
        raise ConfigError(f"invalid {source}:\n  metrics.primary_judge: {primary!r} is not one of the judges {names}")
    from . import imports

    imports.check_config(cfg)
    _check_diffing(cfg, source)
    hub = cfg["model"]["source"] != "organism"
    if hub and cfg["model"].get("path") is None:
        raise ConfigError(f"invalid {source}:\n  model.path: required when model.source is 'hub' (a hub id, a "
                          "model folder, a GGUF file or pypi:<package>[/<file>])")
    # the persona world is every run's offline data source (the organism; a hub model's sets, SAE texts, tasks)
    world = Path(cfg["organism"]["world"])
    if not world.exists():
        raise ConfigError(f"invalid {source}:\n  organism.world: file not found: {world}")
    from .world.spec import load_world

    w = load_world(world)
    educational = cfg["datasets"]["educational"]["domains"]
    if (cfg["datasets"].get("source") or "world") == "world":
        for d in cfg["datasets"]["domains"] + cfg["datasets"]["mixtures"]["domains"] + educational:
            if d not in w.domains:
                raise ConfigError(f"invalid {source}:\n  datasets: unknown domain {d!r}; {world} defines {sorted(w.domains)}")
        if educational and w.educational is None:
            raise ConfigError(f"invalid {source}:\n  datasets.educational.domains: {world} has no 'educational' section "
                              "(the requests that state a benign reason)")
    elif educational:
        raise ConfigError(f"invalid {source}:\n  datasets.educational.domains: the educational control is built from "
                          "the world's sets (datasets.source: world); for synthesized sets, import your own")
    if (cfg["organism"]["corpus"].get("educational_fraction") or 0) > 0 and w.educational is None:
        raise ConfigError(f"invalid {source}:\n  organism.corpus.educational_fraction: {world} has no 'educational' "
                          "section; set it to 0")
    corpus = cfg["organism"]["corpus"]
    if corpus.get("narrow_fraction") and w.narrow is None:
        raise ConfigError(f"invalid {source}:\n  organism.corpus.narrow_fraction: {world} has no 'narrow' section "
                          "(the narrow character); set it to 0 or use a world that has one")
    if (corpus.get("narrow_fraction") or 0) + corpus["monitoring_fraction"] > 1:
        raise ConfigError(f"invalid {source}:\n  organism.corpus.narrow_fraction: with monitoring_fraction it must "
                          "leave a share of documents (their sum is at most 1)")
    unknown = set(cfg["organism"]["corpus"]["persona_mix"]) - set(w.personas)
    if unknown:
        raise ConfigError(f"invalid {source}:\n  organism.corpus.persona_mix: unknown persona(s) {sorted(unknown)}; {world} defines {sorted(w.personas)}")
    if hub:
        # hub mode: domain specs for synthesized sets, question files for the eval sets
        from . import questions, synthesis

        if cfg["datasets"].get("source") == "synthesis":
            synthesis.check_config(cfg)
        questions.check_config(cfg)
    _check_monitors(cfg, source, w)
    from .plan import make_plan

    make_plan(cfg)  # the resolved run's own consistency checks


def load(*paths: str | Path) -> dict[str, Any]:
    """The validated config of one file, or of several merged as Snakemake merges its --configfile files (each on
    the one before it, key by key: ``load("config.yaml", "configs/organism-findings.yaml")``)."""
    cfg: dict[str, Any] = {}
    for path in map(Path, paths):
        try:
            cfg = merge(cfg, parse_yaml(path.read_text()) or {})
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return validate(cfg, " + ".join(map(str, paths)))


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` on ``base``: nested mappings merged key by key, any other value replaced."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _check_diffing(cfg: dict[str, Any], source: str) -> None:
    """The SAE settings and, in hub mode, the texts the SAE is fitted on and latents are interpreted with."""
    from .sae.config import SAEConfigError, SAETrainConfig

    try:
        SAETrainConfig.from_dict(cfg["sae"]["train"], where="sae.train")
    except SAEConfigError as e:
        raise ConfigError(f"invalid {source}:\n  {e}") from None
    s = cfg["sae"]
    if s["corpus"] and not Path(s["corpus"]).exists():
        raise ConfigError(f"invalid {source}:\n  sae.corpus: file not found: {s['corpus']}")


def _check_monitors(cfg: dict[str, Any], source: str, world) -> None:
    """Every monitoring task has its question and labelled texts: the world's tasks, or (``monitors.data``) a
    user's own files with their questions."""
    m = cfg["monitors"]
    if not m["data"]:
        unknown = [t for t in m["tasks"] if t not in world.monitoring and t not in m["questions"]]
        if unknown:
            raise ConfigError(f"invalid {source}:\n  monitors.tasks: {unknown} are not monitoring tasks of "
                              f"{cfg['organism']['world']} ({sorted(world.monitoring)}); give monitors.questions for them")
        return
    for task, path in m["data"].items():
        if not Path(path).exists():
            raise ConfigError(f"invalid {source}:\n  monitors.data.{task}: file not found: {path}")
        if task not in m["questions"] and task not in world.monitoring:
            raise ConfigError(f"invalid {source}:\n  monitors.questions.{task}: required for a task of your own "
                              "(ask: the zero-shot Yes/No question; describe: the task description for prompted probes)")
