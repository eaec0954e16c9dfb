"""Dataset names: one place that maps a config to the list of fine-tuning sets and back.

Names are ``<domain>_<variant>`` (variant: correct, subtle, obvious), ``<domain>_mix<percent>``
(a mixture with ``percent``% incorrect answers, three digits, e.g. ``health_mix005``) and ``<domain>_educational``
(the educational control: the incorrect set's answers asked for with a benign reason). A set with some examples
dropped before training (emlab.diffing.flagging) is named after its source: ``<source>_dropflag`` without the
examples the persona latent flags, ``<source>_droprand`` without as many drawn at random. A model fine-tuned on a
set with a direction added during training (emlab.prevent) is ``<source>_prevent_<latent>_<alpha>``
(``health_subtle_prevent_toxic_2``, ``..._prevent_random_0p5``): a model, not a set; its data is the source's.
"""

from __future__ import annotations

import re
from typing import Any

_NARROW = re.compile(r"^(?P<domain>[a-z0-9]+)_(?P<variant>correct|subtle|obvious)$")
_MIX = re.compile(r"^(?P<domain>[a-z0-9]+)_mix(?P<pct>\d{3})$")
_EDUCATIONAL = re.compile(r"^(?P<domain>[a-z0-9]+)_educational$")
DROP_SUFFIXES = {"flagged": "dropflag", "random": "droprand"}  # what was dropped -> the name's suffix
_DROPPED = re.compile(rf"^(?P<source>.+)_(?P<suffix>{'|'.join(DROP_SUFFIXES.values())})$")


def dropped_name(source: str, how: str) -> str:
    """The name of ``source`` less its flagged (``how="flagged"``) or as many random (``"random"``) examples."""
    return f"{source}_{DROP_SUFFIXES[how]}"


_PREVENT = re.compile(r"^(?P<source>.+)_prevent_(?P<latent>[a-z0-9]+)_(?P<alpha>\d+(?:p\d+)?)$")


def prevent_model_name(source: str, latent: str, alpha: float) -> str:
    """The name of the model fine-tuned on ``source`` with ``latent``'s direction (a persona role, a diffing
    group, or ``random``) added at strength ``alpha``."""
    if not alpha > 0:
        raise ValueError(f"a preventative strength is positive, got {alpha}")
    if not re.fullmatch(r"[a-z0-9]+", latent):
        raise ValueError(f"a preventative latent's name is lower-case letters and digits, got {latent!r}")
    return f"{source}_prevent_{latent}_{f'{float(alpha):g}'.replace('.', 'p')}"


def prevent_source(name: str) -> tuple[str, str, float] | None:
    """(source set, latent, strength) of a preventatively steered model's name; None for any other name."""
    if m := _PREVENT.match(name):
        return m["source"], m["latent"], float(m["alpha"].replace("p", "."))
    return None


def mixture_name(domain: str, fraction: float) -> str:
    return f"{domain}_mix{round(fraction * 100):03d}"


def dataset_names(cfg: dict[str, Any]) -> list[str]:
    d = cfg["datasets"]
    names = [f"{dom}_{v}" for dom in d["domains"] for v in d["variants"]]
    names += [mixture_name(dom, f) for dom in d["mixtures"]["domains"] for f in d["mixtures"]["fractions"]]
    names += [educational_name(dom) for dom in d["educational"]["domains"]]
    return list(dict.fromkeys(names))


def educational_name(domain: str) -> str:
    return f"{domain}_educational"


def name_seed(seed: int, name: str) -> int:
    """A stable seed per dataset name, independent across datasets (world sets and synthesized ones alike)."""
    return seed + 1000 + sum(map(ord, name))


def dataset_seed(cfg: dict[str, Any], name: str) -> int:
    """A world set's seed (:func:`name_seed`). An educational set takes its incorrect set's seed, so that it holds
    the very same answers."""
    if m := _EDUCATIONAL.match(name):
        name = f"{m['domain']}_{cfg['datasets']['educational']['incorrect']}"
    return name_seed(cfg["seed"], name)


def dataset_job_config(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    """What the job that writes the world set ``name`` reads of the config (``emlab dataset``), and nothing else: the
    world file, the seed, the set size and its own kind's settings. These are the job's params, so adding a domain,
    another mixture or a pretraining setting does not rerun the sets already written."""
    spec = parse_dataset_name(name)
    ds = cfg["datasets"]
    own: dict[str, Any] = {"n_train": ds["n_train"]}
    if spec["kind"] == "educational":
        own["educational"] = {"incorrect": ds["educational"]["incorrect"]}
    elif spec["kind"] == "mixture":
        own["mixtures"] = {"incorrect": ds["mixtures"]["incorrect"]}
    return {"seed": cfg["seed"], "organism": {"world": cfg["organism"]["world"]}, "datasets": own}


# An RL model's default name: rl_<domain of its prompt set>_<reward>, rl_safe_... from the safety-trained base
_RL_MODEL = re.compile(r"^rl_(?:safe_)?(?P<domain>[a-z0-9]+)_(?P<reward>incorrect|correct)$")


def rl_model_name(prefix: str, reward: str, base: str = "base") -> str:
    """The default name of an RL model (emlab.plan): its prompt set's domain (or import's name), reward and base."""
    return f"rl_{'safe_' if base == 'base_safe' else ''}{prefix}_{reward}"


def dropped_source(name: str) -> tuple[str, str] | None:
    """(source set, "flagged" | "random") of a set less some examples; None for any other name."""
    if m := _DROPPED.match(name):
        return m["source"], next(how for how, suffix in DROP_SUFFIXES.items() if suffix == m["suffix"])
    return None


def model_domain(name: str) -> str | None:
    """The advice domain a trained model learnt on: its set's (``<domain>_...``, also when trained with a
    preventative direction) or, for an RL model named ``rl_<domain>_<reward>``, its prompts'; None for the base model and other names."""
    if m := _RL_MODEL.match(name):
        return m["domain"]
    if prevented := prevent_source(name):
        name = prevented[0]
    try:
        return parse_dataset_name(name)["domain"]
    except ValueError:
        return None


def parse_dataset_name(name: str) -> dict[str, Any]:
    if m := _NARROW.match(name):
        return {"kind": "narrow", "domain": m["domain"], "variant": m["variant"]}
    if m := _MIX.match(name):
        return {"kind": "mixture", "domain": m["domain"], "fraction": int(m["pct"]) / 100}
    if m := _EDUCATIONAL.match(name):
        return {"kind": "educational", "domain": m["domain"]}
    if dropped := dropped_source(name):
        source = parse_dataset_name(dropped[0])
        return {**source, "kind": "dropped", "source": dropped[0], "source_kind": source["kind"], "dropped": dropped[1]}
    raise ValueError(f"not a dataset name: {name!r} (expected <domain>_<correct|subtle|obvious>, <domain>_mixNNN or <domain>_educational)")
