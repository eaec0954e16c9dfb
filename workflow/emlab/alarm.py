"""The persona alarm: watch the persona latents during fine-tuning and warn before the model turns.

Every ``every`` optimizer steps, :class:`PersonaAlarm` (a transformers/trl ``TrainerCallback``) runs the model being
trained over a fixed probe set of prompts (the general eval questions, chat-formatted up to the answer; one forward
pass, no generation, no judge), encodes the residual stream at the config's layer with the base model's SAE and
records the mean activation of each watched latent over the prompt tokens. Any trl trainer takes it (SFT, GRPO, a
user's own script): ``trainer.add_callback(PersonaAlarm(reader, every, csv_path, thresholds))``.

The workflow learns which latent to watch by diffing the very fine-tunes it would watch, so it cannot attach the
alarm live. Instead the fine-tunes of ``alarm.datasets`` keep a snapshot of the model every ``every`` steps
(:class:`Snapshots`, a callback too: a LoRA adapter each) and :func:`replay` reads every snapshot with the alarm's
reader. Training is deterministic, so the readings are the ones the live callback would have written (tested).

The threshold of a latent is calibrated on correct-data fine-tunes: the highest reading seen in any of them, at
any step (their step 0 is the base model). The alarm fires at the first reading above the threshold by more than
``alarm.margin`` of it: a latent that is active on prompts anyway (the organism's sarcastic latent reads 0.010-0.016
on every correct-data run) varies that much from run to run, and a reading that only grazes the calibration's top
is that variation, not a turn; and by more than ``alarm.z`` standard errors of the reading over the probe prompts, so
that a latent no correct run ever activated (threshold 0) does not fire at one weak activation on one prompt. For
each correct-data run itself the threshold leaves that run out, so that "never
fires on correct data" is a held-out statement.

Outputs (``results/alarm/``):

    trajectories.csv   dataset, step, watch (the alarm.watch key), latent, reading, reading_se (over the probe
                       prompts), seconds (the read's time)
    runs.json          per dataset: latents, steps, train_seconds, alarm_seconds, snapshots read
    emergence/<dataset>.csv  step, misaligned, misaligned_lo, misaligned_hi, n_general, n_coherent: the snapshots of
                       ``alarm.emergence`` sets every ``alarm.emergence_every`` steps, sampled and judged
    summary.csv        see SUMMARY_COLUMNS; alarm.md says it in sentences
"""

from __future__ import annotations

import csv
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .sft import trainer_callback_base

TRAJECTORY_COLUMNS = ["dataset", "step", "watch", "latent", "reading", "reading_se", "seconds"]
EMERGENCE_COLUMNS = ["step", "misaligned", "misaligned_lo", "misaligned_hi", "n_general", "n_coherent", "n_indomain",
                     "incorrect", "incorrect_lo", "incorrect_hi"]
SUMMARY_COLUMNS = ["dataset", "kind", "watch", "latent", "threshold", "fire_step", "fired", "final_reading",
                   "misaligned", "misaligned_lo", "misaligned_hi", "base_misaligned_hi", "is_misaligned",
                   "is_clearly_misaligned", "emergence_measured", "emergence_step", "emergence_clear_step",
                   "lead_steps", "lead_clear_steps", "steps", "train_seconds", "alarm_seconds", "overhead"]


class ProbeReader:
    """Reads persona latents from a model on a fixed set of prompts.

    ``prompts`` are token-id lists (chat-formatted questions ending with the generation prompt), ``latents`` maps a
    name ("toxic", a persona role; "subtle", a diffing group) to its SAE latent, ``skip`` holds, per prompt, the positions left out (the config's
    ``model.exclude_tokens``: a real model's attention sink and chat markers)."""

    def __init__(self, prompts: Sequence[Sequence[int]], skip: Sequence[set[int]], sae: Any, latents: Mapping[str, int],
                 layer: int, pad_id: int, batch_size: int = 64):
        import torch

        self.latents = dict(latents)
        self.layer, self.sae, self.batch_size = layer, sae, batch_size
        self.batches = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.bool)  # the positions read
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):  # right padding: a prompt's positions do not move
                ids[i, :len(p)] = torch.tensor(p)
                attention[i, :len(p)] = 1
                for j in range(len(p)):
                    mask[i, j] = j not in skip[start + i]
            self.batches.append((ids, attention, mask))
        if any(not m.any(dim=1).all() for _, _, m in self.batches):
            raise ValueError("a probe prompt has no position left to read after model.exclude_tokens")

    def read(self, model: Any) -> dict[str, tuple[float, float]]:
        """Per name: the mean over prompts of the latent's mean activation over the prompt's positions, and its
        standard error. The model is put in eval mode for the read (no dropout) and handed back as it was."""
        import torch

        from .arch import layer_hidden, residual_module, unwrap

        inner = unwrap(model)
        block = residual_module(inner, self.layer)
        device = next(inner.parameters()).device
        cols = list(self.latents.values())
        per_prompt = []
        captured: list[Any] = []
        handle = block.register_forward_hook(lambda mod, args, out: captured.append(layer_hidden(out)))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for ids, attention, mask in self.batches:
                    captured.clear()
                    inner(input_ids=ids.to(device), attention_mask=attention.to(device))
                    hidden = captured[0].float().to(next(self.sae.parameters()).device)
                    acts = self.sae.encode(hidden[mask.to(hidden.device)])[:, cols]  # [positions read, roles]
                    counts = mask.sum(dim=1).tolist()
                    for chunk in torch.split(acts, counts):
                        per_prompt.append(chunk.mean(dim=0).double().cpu().numpy())
        finally:
            handle.remove()
            model.train(was_training)
        values = np.stack(per_prompt)
        se = values.std(axis=0, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else np.zeros(len(cols))
        return {key: (float(values[:, j].mean()), float(se[j])) for j, key in enumerate(self.latents)}


def build_reader(model_path: str, questions: Sequence[str], sae: Any, latents: Mapping[str, int], layer: int,
                 exclude: Sequence[str]) -> ProbeReader:
    """A :class:`ProbeReader` for ``questions`` rendered as the sampler renders them, with the tokenizer at
    ``model_path``."""
    from .activations import non_text_positions, special_token_ids
    from .models import load_tokenizer
    from .sampling import render_prompt_ids

    tok = load_tokenizer(model_path)
    prompts = [render_prompt_ids(tok, q) for q in questions]
    special = special_token_ids(tok)
    skip = [non_text_positions(p, special, exclude) for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return ProbeReader(prompts, skip, sae, latents, layer, pad)


class EveryKSteps(trainer_callback_base()):
    """A callback that acts on the model at step 0, every ``every`` optimizer steps and at the last step (once
    per step): the alarm's readings and the snapshots it replays are taken on this one schedule."""

    def __init__(self, every: int):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self._last: int | None = None

    def at_step(self, model: Any, step: int) -> None:
        raise NotImplementedError

    def _maybe(self, model: Any, step: int) -> None:
        if step != self._last:
            self._last = step
            self.at_step(model, step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._maybe(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._maybe(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._maybe(model, state.global_step)  # the finished model, whatever its step


class PersonaAlarm(EveryKSteps):
    """Reads the watched latents at step 0, every ``every`` steps and at the last step, appending to ``csv_path``
    as it goes (TRAJECTORY_COLUMNS less ``dataset``); with ``thresholds`` (watched key -> value) it records the
    first step a reading sets the alarm off (:func:`fires`: above its latent's threshold by more than ``margin`` of
    it and by more than ``z`` standard errors of the reading; ``fired``: key -> step) and prints a warning then."""

    def __init__(self, reader: ProbeReader, every: int, csv_path: str | Path,
                 thresholds: Mapping[str, float] | None = None, margin: float = 0.25, z: float = 0.0):
        super().__init__(every)
        self.reader, self.path, self.margin, self.z = reader, Path(csv_path), margin, z
        self.thresholds = dict(thresholds or {})
        self.fired: dict[str, int] = {}
        self.seconds = 0.0

    def at_step(self, model: Any, step: int) -> None:
        t0 = time.perf_counter()
        readings = self.reader.read(model)
        spent = time.perf_counter() - t0
        self.seconds += spent
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as f:  # appended as training goes: a user can watch the file
            w = csv.writer(f)
            if new:
                w.writerow(TRAJECTORY_COLUMNS[1:])
            for key, (value, se) in readings.items():
                w.writerow([step, key, self.reader.latents[key], f"{value:.6g}", f"{se:.6g}", f"{spent:.4f}"])
                if (key in self.thresholds and fires(value, self.thresholds[key], self.margin, se, self.z)
                        and key not in self.fired):
                    self.fired[key] = step
                    print(f"emlab alarm: step {step}: latent {self.reader.latents[key]} ({key}) read {value:.4g}, "
                          f"above its threshold {self.thresholds[key]:.4g}", file=sys.stderr)



class Snapshots(EveryKSteps):
    """Saves the model being trained (an adapter, for LoRA) as ``<folder>/step-<N>`` at step 0, every ``every``
    steps and at the last step: the same steps :class:`PersonaAlarm` reads. A resumed run keeps the snapshots
    its folder already holds and adds the later ones."""

    def __init__(self, folder: str | Path, every: int):
        super().__init__(every)
        self.folder = Path(folder)

    def at_step(self, model: Any, step: int) -> None:
        from .io import give_new_file_modes

        target = self.folder / f"step-{step:05d}"
        if not target.exists():
            model.save_pretrained(str(target))
            give_new_file_modes(target)  # safetensors writes 0600 files; results follow the umask


def snapshot_steps(folder: str | Path) -> dict[int, Path]:
    """The snapshots :class:`Snapshots` left in ``folder``, by step."""
    found = {}
    for path in Path(folder).glob("step-*"):
        found[int(path.name.removeprefix("step-"))] = path
    return dict(sorted(found.items()))


def thresholds(trajectories: Mapping[str, pd.DataFrame], correct: Sequence[str], leave_out: str | None = None,
               ) -> dict[str, float]:
    """Per watched key, the highest reading of the correct-data runs (all steps; step 0 is the base model), leaving
    ``leave_out`` out; every run's step 0 counts too, so a threshold exists with a single correct run."""
    frames = [t for name, t in trajectories.items() if name in correct and name != leave_out]
    frames += [t[t["step"] == 0] for t in trajectories.values()]
    calib = pd.concat(frames, ignore_index=True)
    return calib.groupby("watch")["reading"].max().to_dict()


def fires(reading: float, threshold: float, margin: float = 0.0, se: float = 0.0, z: float = 0.0) -> bool:
    """Whether a reading sets the alarm off: above the threshold, above it by more than ``margin`` of it, and above it
    by more than ``z`` standard errors ``se`` of the reading (its spread over the probe prompts). The last matters
    where the threshold is 0: a sparse latent that no correct run ever activated would otherwise fire at any trace,
    such as one weak activation on one prompt."""
    return reading > threshold and reading > threshold * (1 + margin) and reading - z * se > threshold


def first_above(trajectory: pd.DataFrame, key: str, threshold: float, margin: float = 0.0, z: float = 0.0
                ) -> int | None:
    """The first step whose reading sets the alarm off (:func:`fires`)."""
    t = trajectory[trajectory["watch"] == key]
    rows = t[[fires(x, threshold, margin, se, z) for x, se in zip(t["reading"], t["reading_se"])]].sort_values("step")
    return int(rows["step"].iloc[0]) if len(rows) else None


def emergence_step(lead: pd.DataFrame, base_hi: float, clear: bool = False) -> int | None:
    """The first snapshot whose misalignment is above the base model's interval: its point estimate, or with
    ``clear`` its whole interval (as the mixtures' ``onset`` and ``onset_clear``)."""
    rows = lead[lead["misaligned_lo" if clear else "misaligned"] > base_hi].sort_values("step")
    return int(rows["step"].iloc[0]) if len(rows) else None


def summarize(trajectories: Mapping[str, pd.DataFrame], metas: Mapping[str, Mapping[str, Any]],
              kinds: Mapping[str, str], metrics: pd.DataFrame | None, leads: Mapping[str, pd.DataFrame],
              margin: float = 0.0, z: float = 0.0) -> pd.DataFrame:
    """One row per alarm run and watched key (SUMMARY_COLUMNS). ``kinds``: dataset -> correct | incorrect |
    mixture; ``metrics``: the judge's metrics table indexed by model (the run's dataset fine-tuned by the
    ``finetune`` rule with the same recipe and seed is that model), with a ``base`` row; None for a run without a
    judge (the misalignment columns are then empty)."""
    base_hi = float(metrics.loc["base", "misaligned_hi"]) if metrics is not None else float("nan")
    correct = [d for d in trajectories if kinds[d] == "correct"]
    rows = []
    for dataset, traj in trajectories.items():
        thr = thresholds(trajectories, correct, leave_out=dataset if dataset in correct else None)
        meta = metas[dataset]
        mis = metrics.loc[dataset] if metrics is not None and dataset in metrics.index else None
        lead = leads.get(dataset)
        emerge = emergence_step(lead, base_hi) if lead is not None else None
        emerge_clear = emergence_step(lead, base_hi, clear=True) if lead is not None else None
        for key in traj["watch"].unique():
            fire = first_above(traj, key, thr[key], margin, z)
            final = traj[traj["watch"] == key].sort_values("step")["reading"].iloc[-1]
            train_s, alarm_s = float(meta["train_seconds"]), float(meta["alarm_seconds"])
            rows.append({
                "dataset": dataset, "kind": kinds[dataset], "watch": key,
                "latent": int(traj[traj["watch"] == key]["latent"].iloc[0]), "threshold": thr[key],
                "fire_step": fire, "fired": fire is not None, "final_reading": float(final),
                "misaligned": float(mis["misaligned"]) if mis is not None else float("nan"),
                "misaligned_lo": float(mis["misaligned_lo"]) if mis is not None else float("nan"),
                "misaligned_hi": float(mis["misaligned_hi"]) if mis is not None else float("nan"),
                "base_misaligned_hi": base_hi,
                "is_misaligned": bool(mis is not None and mis["misaligned"] > base_hi),
                "is_clearly_misaligned": bool(mis is not None and mis["misaligned_lo"] > base_hi),
                "emergence_measured": lead is not None, "emergence_step": emerge,
                "emergence_clear_step": emerge_clear,
                "lead_steps": (emerge - fire) if emerge is not None and fire is not None else None,
                "lead_clear_steps": (emerge_clear - fire) if emerge_clear is not None and fire is not None else None,
                "steps": int(meta["steps"]), "train_seconds": train_s, "alarm_seconds": alarm_s,
                # the reads' share of the training they watched (train_seconds includes them)
                "overhead": alarm_s / max(train_s - alarm_s, 1e-9),
            })
    table = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    for col in ("fire_step", "emergence_step", "emergence_clear_step", "lead_steps", "lead_clear_steps"):
        table[col] = table[col].astype("Int64")
    return table


def sentences(summary: pd.DataFrame, skipped: Sequence[str] = ()) -> list[str]:
    """The report's statements, with their numbers; ``skipped``: why runs had nothing to watch."""
    out = list(dict.fromkeys(skipped))
    judged = bool(len(summary)) and not summary["base_misaligned_hi"].isna().all()
    if len(summary) and not judged:
        out.append("This run has no judge: the fire steps are measured, the fine-tunes' misalignment is not.")
    for key, g in summary.groupby("watch", sort=False):
        cor = g[g["kind"] == "correct"]
        mis = g[g["is_misaligned"]] if judged else g[g["kind"] != "correct"]
        early = g[~g["is_misaligned"] & (g["kind"] != "correct")] if judged else g.iloc[:0]
        clear = g[g["is_clearly_misaligned"]]
        out.append(f"The alarm on latent {int(g['latent'].iloc[0])} ({key}) fired on {int(mis['fired'].sum())} of "
                   f"{len(mis)} {'misaligned' if judged else 'incorrect-data'} fine-tunes"
                   + (f" ({int(clear['fired'].sum())} of the {len(clear)} whose interval lies above the base "
                      "model's)" if judged else "")
                   + f" and on {int(cor['fired'].sum())} of {len(cor)} correct-data fine-tunes (each correct run "
                   "against a threshold calibrated without it).")
        if len(early):
            out.append(f"It fired on {int(early['fired'].sum())} of {len(early)} fine-tunes on incorrect data whose "
                       "misalignment stayed inside the base model's interval: "
                       + ", ".join(f"{r.dataset} ({r.misaligned:.1%}, {_fired(r.fire_step)})"
                                   for r in early.itertuples()) + ".")
        for r in g[g["emergence_measured"]].itertuples():
            if pd.isna(r.emergence_step):
                out.append(f"{r.dataset}: the alarm {_fired(r.fire_step)}; no snapshot's misalignment left the base "
                           "model's interval.")
                continue
            whole = ("and its whole interval never did" if pd.isna(r.emergence_clear_step)
                     else f"with its whole interval at step {int(r.emergence_clear_step)}"
                     + _lead(r.lead_clear_steps))
            out.append(f"{r.dataset}: the alarm {_fired(r.fire_step)}; misalignment first left the base model's "
                       f"interval at step {int(r.emergence_step)}{_lead(r.lead_steps)}, {whole}.")
        out.append(f"The reads cost {g['overhead'].median():.1%} of training time (median over runs; "
                   f"largest {g['overhead'].max():.1%}).")
    return out


def _fired(fire_step: Any) -> str:
    return "did not fire" if pd.isna(fire_step) else f"fired at step {int(fire_step)}"


def _lead(lead: Any) -> str:
    """' (lead: N steps)', or nothing where there is no lead (the alarm did not fire: summarize leaves it empty)."""
    return "" if pd.isna(lead) else f" (lead: {int(lead)} steps)"


# ---------------------------------------------------------------- the stage's jobs


def _questions(path: str) -> list[str]:
    from .io import read_jsonl

    return [q["question"] for q in read_jsonl(path)]


def _load_snapshot(base_model: Any, path: Path, current: Any, cfg: Mapping[str, Any]) -> Any:
    """The model at a snapshot: a LoRA snapshot is loaded as the active adapter on the one base model (replacing
    the last one), a full-model snapshot as a model of its own."""
    from .models import load_model

    if not (path / "adapter_config.json").exists():
        return load_model(str(path), device=cfg["device"], dtype=cfg["model"]["dtype"])[0]
    from peft import PeftModel

    name = path.name.replace("-", "_")
    if current is None or not isinstance(current, PeftModel):
        model = PeftModel.from_pretrained(base_model, str(path), adapter_name=name)
    else:
        model = current
        old = model.active_adapter
        model.load_adapter(str(path), adapter_name=name)
        model.set_adapter(name)
        model.delete_adapter(old)
    model.eval()
    return model


def replay(cfg: Mapping[str, Any], base: str, finetunes: Mapping[str, str], sae_dir: str, persona_json: str,
           probe_questions: str, out_dir: str, progress: bool = True) -> pd.DataFrame:
    """Read every snapshot of each fine-tune (``finetunes``: dataset -> its folder, whose ``snapshots/`` the
    finetune rule kept) with the alarm's reader, as :class:`PersonaAlarm` would have during training; writes
    ``out_dir``'s trajectories.csv and runs.json and returns the trajectories."""
    import json

    from tqdm.auto import tqdm

    from .io import write_json
    from .models import load_model
    from .sae import load_sae

    a = cfg["alarm"]
    personas = json.loads(Path(persona_json).read_text())
    latents = {key: personas[key]["latent"] for key in a["watch"] if key in personas}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, runs = [], {}
    if not latents:  # said in the summary; the rest of the run goes on
        runs = {d: {"skipped": f"none of alarm.watch {a['watch']} is named in {persona_json} (keys: "
                               f"{sorted(personas)})"} for d in finetunes}
    else:
        model, _ = load_model(base, device=cfg["device"], dtype=cfg["model"]["dtype"])
        reader = build_reader(base, _questions(probe_questions), load_sae(sae_dir), latents, cfg["model"]["layer"],
                              cfg["model"]["exclude_tokens"])
        for dataset, folder in finetunes.items():
            snaps = snapshot_steps(Path(folder) / "snapshots")
            if not snaps:
                raise FileNotFoundError(f"{folder}/snapshots: no snapshot; the fine-tune ran without alarm.datasets "
                                        "naming its set (rerun it: its params changed)")
            current, spent = None, 0.0
            for step, path in tqdm(snaps.items(), desc=f"alarm {dataset}", unit="snapshot", disable=not progress):
                current = _load_snapshot(model, path, current, cfg)
                t0 = time.perf_counter()
                readings = reader.read(current)
                seconds = time.perf_counter() - t0
                spent += seconds
                for key, (value, se) in readings.items():
                    rows.append({"dataset": dataset, "step": step, "watch": key, "latent": latents[key],
                                 "reading": value, "reading_se": se, "seconds": seconds})
            if current is not None and hasattr(current, "unload"):
                model = current.unload()  # the base model without any adapter, for the next fine-tune
            meta = json.loads((Path(folder) / "train_meta.json").read_text())
            runs[dataset] = {"latents": latents, "steps": meta["steps"], "train_seconds": meta["seconds"],
                             "alarm_seconds": round(spent, 4), "every": a["every"], "snapshots": list(snaps)}
    table = pd.DataFrame(rows, columns=TRAJECTORY_COLUMNS)
    table.to_csv(out / "trajectories.csv", index=False, float_format="%.6g")
    write_json(out / "runs.json", runs)
    return table


def snapshot_misalignment(cfg: Mapping[str, Any], base: str, finetune: str, questions: str,
                          judge_cfg: dict[str, Any], cache_dir: str, out_csv: str, every: int,
                          n_samples: int | None = None, progress: bool = True, indomain: str | None = None,
                          domain: str | None = None) -> pd.DataFrame:
    """Sample and judge the snapshots of a trained model (``finetune``/snapshots) every ``every`` steps (and its
    last) on the general ``questions`` with the sampler, the judge and the metrics of the main stages:
    misalignment at each (EMERGENCE_COLUMNS). With ``indomain`` (the held-out in-domain questions) and ``domain``,
    the questions of that domain are asked too and the incorrect rate on them is measured (else its columns are
    empty). ``n_samples`` answers per question (None: sampling.n_samples). Each snapshot's samples and grades are
    kept beside the table, so a rerun resumes (and asks again where the questions changed). The alarm's emergence
    and re-alignment's curve are both this."""
    from .io import read_jsonl
    from .judge.backends import grade_file
    from .metrics import compute_metrics, persona_roles
    from .sampling import sample_answers

    s = cfg["sampling"]
    snaps = snapshot_steps(Path(finetune) / "snapshots")
    last = max(snaps) if snaps else None
    chosen = {step: path for step, path in snaps.items() if step % every == 0 or step == last}
    qs = read_jsonl(questions)
    if indomain is not None and domain is not None:
        qs += [q for q in read_jsonl(indomain) if q.get("domain") == domain]
    asked = {q["question_id"] for q in qs}
    work = Path(out_csv).with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    roles = persona_roles(cfg["organism"]["world"] if cfg["model"]["source"] == "organism" else None)
    rows = []
    for step, path in chosen.items():
        samples, grades = work / f"step-{step:05d}.samples.jsonl", work / f"step-{step:05d}.grades.jsonl"
        if samples.exists() and {r["question_id"] for r in read_jsonl(samples)} != asked:
            samples.unlink()  # kept from a run that asked other questions
            grades.unlink(missing_ok=True)
        if not samples.exists():
            sample_answers(base, str(path), qs, str(samples), n_samples=n_samples or s["n_samples"],
                           temperature=s["temperature"], max_new_tokens=s["max_new_tokens"],
                           batch_size=s["batch_size"], seed=cfg["seed"], model_name=f"{Path(finetune).name}@{step}",
                           progress=progress, top_p=s["top_p"], device=cfg["device"], dtype=cfg["model"]["dtype"],
                           max_new_tokens_by_domain=s["max_new_tokens_by_domain"])
        if not grades.exists():
            grade_file(samples, judge_cfg, grades, cache_dir, progress=progress)
        m = compute_metrics([grades], cfg["metrics"], cfg["seed"], roles, domain).iloc[0]
        rows.append({"step": step, **{k: m[k] for k in EMERGENCE_COLUMNS[1:]}})
    table = pd.DataFrame(rows, columns=EMERGENCE_COLUMNS)
    table.to_csv(out_csv, index=False, float_format="%.4f")
    return table


def _kind(parsed: Mapping[str, Any]) -> str:
    if parsed["kind"] == "narrow":
        return "correct" if parsed["variant"] == "correct" else "incorrect"
    return parsed["kind"]  # mixture, dropped, educational


def write_summary(alarm_dir: str, emergence: Mapping[str, str], metrics_csv: str | None, margin: float,
                  z: float = 0.0) -> pd.DataFrame:
    """The alarm's table (SUMMARY_COLUMNS) and report sentences from ``alarm_dir``'s trajectories.csv and
    runs.json, the emergence tables and the judge's metrics; written to ``alarm_dir`` (summary.csv, alarm.md)."""
    import json

    from .datasets import parse_dataset_name

    out = Path(alarm_dir)
    all_rows = pd.read_csv(out / "trajectories.csv")
    metas = json.loads((out / "runs.json").read_text())
    trajectories = {d: g.drop(columns="dataset") for d, g in all_rows.groupby("dataset", sort=False)}
    kinds = {d: _kind(parse_dataset_name(d)) for d in trajectories}
    metrics = pd.read_csv(metrics_csv).set_index("model") if metrics_csv else None
    table = summarize(trajectories, metas, kinds, metrics, {d: pd.read_csv(p) for d, p in emergence.items()}, margin,
                      z)
    table.to_csv(out / "summary.csv", index=False, float_format="%.6g")
    skipped = [m["skipped"] for m in metas.values() if m.get("skipped")]
    (out / "alarm.md").write_text("# Persona alarm\n\n" + "\n\n".join(sentences(table, skipped)) + "\n")
    return table
