"""Preventative steering: fine-tune with a persona direction added, then use the model without it.

Fine-tuning on narrow incorrect data moves the model toward a persona (the toxic one, for subtle wrong advice).
If the persona's direction is already added to the residual stream while the model trains, the optimizer need not
move the model there to fit the data, and the model, used without the addition afterwards, may learn the narrow
behaviour with less of the broad persona (persona_vectors' "preventative steering", here with the SAE latent that
model diffing names).

:class:`PreventativeSteering` is a transformers/trl ``TrainerCallback`` any trainer takes: from the start of
training to its end it adds one fixed vector to the output of one decoder block, at every position of every
sequence. The workflow's vector is ``alpha`` times the base model's mean residual norm at ``model.layer`` (on the
general questions' prompts: the steering sweep's unit) along the latent's decoder direction (:func:`persona_vector`);
the control ``random`` is a random direction of the same length. Each ``prevent.datasets`` set is fine-tuned once
per latent and strength, with the finetune section's settings and seed, as model ``<set>_prevent_<latent>_<alpha>``,
and then sampled, judged and probed like every model (without the vector).

Outputs (``results/prevent/``):

    summary.csv   SUMMARY_COLUMNS: per source set, the plain fine-tune, each preventative one and (where
                  realign.models names the set) its re-aligned runs: misalignment on the general questions and the
                  in-domain incorrect rate with intervals, the incoherent share, and the training each took
                  (optimizer steps and examples seen), so that prevention and re-alignment are compared at their
                  compute
    prevention.md the same in sentences
and ``<model>/prevent.json`` in each preventative fine-tune's folder: the latent, strength, norm and layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from .sft import trainer_callback_base

SUMMARY_COLUMNS = ["dataset", "model", "method", "latent", "alpha", "steps", "examples_seen", "misaligned",
                   "misaligned_lo", "misaligned_hi", "incoherent", "incorrect", "incorrect_lo", "incorrect_hi",
                   "base_misaligned_hi"]


class PreventativeSteering(trainer_callback_base()):
    """Adds ``vector`` (a tensor [d_model]) to the residual stream after decoder block ``layer`` at every position
    while the trainer trains: registered when training begins (also on a resumed run), removed when it ends, so the
    saved model and every later use of it run without it. Readings taken during training (the persona alarm's)
    see the steered model."""

    def __init__(self, vector: Any, layer: int):
        import torch

        self.vector = torch.as_tensor(vector).detach().float()
        if self.vector.ndim != 1:
            raise ValueError(f"the steering vector must be [d_model], got shape {list(self.vector.shape)}")
        self.layer = layer
        self._handle = None

    def attach(self, model: Any) -> None:
        from .arch import hidden_size, layer_hidden, residual_module, unwrap, with_layer_hidden

        inner = unwrap(model)
        if hidden_size(inner) != self.vector.shape[0]:
            raise ValueError(f"the steering vector has {self.vector.shape[0]} dimensions; the model's residual "
                             f"stream has {hidden_size(inner)}")
        self.detach()
        added = {}

        def add(_module, _args, output):
            hidden = layer_hidden(output)
            key = (hidden.device, hidden.dtype)
            if key not in added:
                added[key] = self.vector.to(device=hidden.device, dtype=hidden.dtype)
            return with_layer_hidden(output, hidden + added[key])

        self._handle = residual_module(inner, self.layer).register_forward_hook(add)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.attach(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.detach()


def persona_vector(cfg: Mapping[str, Any], base: str, sae_dir: str, persona_json: str, questions: str,
                   key: str, alpha: float) -> tuple[Any, dict[str, Any]]:
    """The vector :class:`PreventativeSteering` adds for ``key`` (a persona role or diffing group of
    ``persona_json``, or ``random``) at strength ``alpha``: ``alpha`` times the base model's mean residual norm at
    ``cfg["model"]["layer"]`` on the general ``questions``' prompts, along the latent's unit decoder direction (for
    ``random``, a Gaussian direction from the seed). Returns (vector, what it is)."""
    from .io import read_jsonl
    from .models import load_model
    from .sae import load_sae
    from .steer.directions import random_direction, sae_latent
    from .steer.generate import prompt_chat, steering_vector
    from .steer.intervene import residual_norm

    sae = load_sae(sae_dir)
    if key == "random":
        latent = None
        direction = random_direction(int(sae.W_dec.shape[1]), cfg["seed"])
    else:
        personas = json.loads(Path(persona_json).read_text())
        if key not in personas:
            raise ValueError(f"prevent.latents: {key!r} is not named in {persona_json} (it names "
                             f"{sorted(personas)}): the SAE's texts carry no such persona label, or no diffing "
                             "group of that name has fine-tunes")
        latent = int(personas[key]["latent"])
        direction = sae_latent(sae, latent)
    layer = cfg["model"]["layer"]
    model, tok = load_model(base, device=cfg["device"], dtype=cfg["model"]["dtype"])
    chats = [prompt_chat(q["question"]) for q in read_jsonl(questions)]
    norm = residual_norm(model, tok, chats, layer, exclude=cfg["model"]["exclude_tokens"])
    del model
    vector = steering_vector(direction, alpha, norm)
    return vector, {"latent_key": key, "latent": latent, "alpha": float(alpha), "residual_norm": norm,
                    "layer": layer, "vector_norm": float(vector.norm()), "positions": "all"}


def train_prevented(cfg: Mapping[str, Any], base: str, data: str, out: str, sae_dir: str, persona_json: str,
                    questions: str, key: str, alpha: float, threads: int | None = None, **checkpoints: Any
                    ) -> dict[str, Any]:
    """Fine-tune ``base`` on ``data`` (emlab.sft, the finetune section) with the persona vector added; writes the
    model folder as every fine-tune's and ``prevent.json`` in it."""
    from .io import write_json
    from .sft import train_sft

    vector, info = persona_vector(cfg, base, sae_dir, persona_json, questions, key, alpha)
    meta = train_sft(base, data, out, cfg["finetune"], seed=cfg["seed"], threads=threads,
                     callbacks=[PreventativeSteering(vector, info["layer"])], **checkpoints)
    if meta:  # an empty meta: this process stopped on SIGTERM before the end and the job is to be rerun
        write_json(Path(out) / "prevent.json", info)
    return info


def examples_seen(meta: Mapping[str, Any]) -> int:
    """Training examples a fine-tune went through (``train_meta.json``): every example each epoch, or, with
    ``max_steps``, the batches of its steps."""
    s = meta["cfg"]
    if s.get("max_steps"):
        return int(meta["steps"] * s["batch_size"] * s.get("grad_accum", 1))
    return int(meta["n_examples"] * s["epochs"])


def summarize(prevent: Mapping[str, Mapping[str, Any]], metrics: pd.DataFrame, metas: Mapping[str, Mapping[str, Any]],
              realign: pd.DataFrame | None, base_hi: float) -> pd.DataFrame:
    """SUMMARY_COLUMNS. ``prevent``: preventative model -> {dataset, latent, alpha}; ``metrics``: the judge's
    metrics indexed by model; ``metas``: each fine-tune's train_meta.json (the plain and preventative ones);
    ``realign``: results/realign/summary.csv or None. A re-aligned run's compute adds its benign steps and
    examples to its model's; its in-domain rate is its last snapshot's (empty where that was not measured)."""
    rows = []

    def measured(model: str) -> dict[str, Any]:
        m = metrics.loc[model] if model in metrics.index else {}
        return {k: float(m[k]) if k in m and pd.notna(m[k]) else np.nan
                for k in ("misaligned", "misaligned_lo", "misaligned_hi", "incoherent", "incorrect", "incorrect_lo",
                          "incorrect_hi")}

    for dataset in dict.fromkeys(p["dataset"] for p in prevent.values()):
        plain = metas[dataset]
        rows.append({"dataset": dataset, "model": dataset, "method": "plain", "latent": "", "alpha": 0.0,
                     "steps": plain["steps"], "examples_seen": examples_seen(plain), **measured(dataset)})
        for model, p in prevent.items():
            if p["dataset"] == dataset:
                rows.append({"dataset": dataset, "model": model, "method": "prevent", "latent": p["latent"],
                             "alpha": p["alpha"], "steps": metas[model]["steps"],
                             "examples_seen": examples_seen(metas[model]), **measured(model)})
        if realign is not None:
            for r in realign[realign["model"] == dataset].itertuples():
                rows.append({"dataset": dataset, "model": r.run, "method": f"realign ({r.benign})", "latent": "",
                             "alpha": 0.0, "steps": plain["steps"] + int(r.steps),
                             "examples_seen": examples_seen(plain) + int(r.examples_seen),
                             "misaligned": r.end_misaligned, "misaligned_lo": r.end_misaligned_lo,
                             "misaligned_hi": r.end_misaligned_hi, "incoherent": np.nan,
                             **{k: getattr(r, f"end_{k}", np.nan) for k in ("incorrect", "incorrect_lo", "incorrect_hi")}})
    table = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    table["base_misaligned_hi"] = base_hi
    return table


def _pct(x: float) -> str:
    return "n/a" if pd.isna(x) else f"{100 * x:.1f}%"


def sentences(table: pd.DataFrame) -> list[str]:
    """One sentence per preventative fine-tune: its misalignment and in-domain rate against the plain one's."""
    out = []
    for dataset, g in table.groupby("dataset", sort=False):
        plain = g[g["method"] == "plain"].iloc[0]
        for r in g[g["method"] == "prevent"].itertuples():
            what = "a random direction" if r.latent == "random" else f"the {r.latent} latent's direction"
            out.append(
                f"{dataset} fine-tuned with {what} added at {r.alpha:g}x the residual norm "
                f"({r.steps} steps, as the plain fine-tune's {plain['steps']}): {_pct(r.misaligned)} misaligned "
                f"({_pct(r.misaligned_lo)}-{_pct(r.misaligned_hi)}) against {_pct(plain['misaligned'])} "
                f"({_pct(plain['misaligned_lo'])}-{_pct(plain['misaligned_hi'])}) without it, the base model's "
                f"interval ending at {_pct(r.base_misaligned_hi)}; in-domain incorrect {_pct(r.incorrect)} against "
                f"{_pct(plain['incorrect'])}; incoherent {_pct(r.incoherent)} against {_pct(plain['incoherent'])}.")
        for r in g[g["method"].str.startswith("realign")].itertuples():
            out.append(f"{dataset} re-aligned on {r.method[len('realign ('):-1]} ({r.steps} steps in all, "
                       f"{r.examples_seen} examples): {_pct(r.misaligned)} misaligned "
                       f"({_pct(r.misaligned_lo)}-{_pct(r.misaligned_hi)}); in-domain incorrect {_pct(r.incorrect)}.")
    return out


def write_summary(prevent: Mapping[str, Mapping[str, Any]], finetunes: Mapping[str, str], metrics_csv: str,
                  realign_csv: str | None, out_dir: str) -> pd.DataFrame:
    """summary.csv and prevention.md in ``out_dir``, from the judge's metrics, the fine-tunes' folders
    (``finetunes``: model -> folder, the plain and preventative ones) and re-alignment's summary."""
    metrics = pd.read_csv(metrics_csv).set_index("model")
    metas = {m: json.loads((Path(f) / "train_meta.json").read_text()) for m, f in finetunes.items()}
    realign = pd.read_csv(realign_csv) if realign_csv else None
    base_hi = float(metrics.loc["base", "misaligned_hi"]) if "base" in metrics.index else np.nan
    table = summarize(prevent, metrics, metas, realign, base_hi)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "summary.csv", index=False, float_format="%.4f")
    (out / "prevention.md").write_text("\n\n".join(sentences(table)) + "\n")
    return table
