"""The persona alarm: watch the persona latents during fine-tuning and warn before the model turns.

Every ``every`` optimizer steps, :class:`PersonaAlarm` (a transformers/trl ``TrainerCallback``) runs the model being
trained over a fixed probe set of prompts (the general eval questions, chat-formatted up to the answer; one forward
pass, no generation, no judge), encodes the residual stream at the config's layer with the base model's SAE and
records the mean activation of each watched persona latent over the prompt tokens. Any trl trainer takes it (SFT,
GRPO, a user's own script): ``trainer.add_callback(PersonaAlarm(reader, every, csv_path, thresholds))``.

The threshold of a latent is calibrated on correct-data fine-tunes: the highest reading seen in any of them, at
any step (their step 0 is the base model). The alarm fires at the first reading above it. For each correct-data run
itself the threshold leaves that run out, so that "never fires on correct data" is a held-out statement.

Outputs (``results/alarm/``):

    runs/<dataset>/trajectory.csv  step, watch (the alarm.watch key), latent, reading, reading_se (over the probe prompts), seconds (spent
                                   reading)
    runs/<dataset>/meta.json       dataset, steps, train_seconds, alarm_seconds, every, snapshots (the steps kept)
    runs/<dataset>/snapshots/step-<N>/  adapter snapshots (datasets in ``alarm.lead`` only)
    emergence/<dataset>.csv        step, misaligned, misaligned_lo, misaligned_hi, n_general, n_coherent: each
                                   snapshot sampled and judged
    summary.csv                    see SUMMARY_COLUMNS
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

TRAJECTORY_COLUMNS = ["step", "watch", "latent", "reading", "reading_se", "seconds"]
EMERGENCE_COLUMNS = ["step", "misaligned", "misaligned_lo", "misaligned_hi", "n_general", "n_coherent"]
SUMMARY_COLUMNS = ["dataset", "kind", "watch", "latent", "threshold", "fire_step", "fired", "final_reading",
                   "misaligned", "misaligned_lo", "misaligned_hi", "base_misaligned_hi", "is_misaligned",
                   "emergence_measured", "emergence_step", "lead_steps", "steps", "train_seconds", "alarm_seconds", "overhead"]


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


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class PersonaAlarm(_callback_base()):
    """Reads the persona latents at step 0 and every ``every`` steps (and at the last step), appending to
    ``csv_path`` as it goes; with ``thresholds`` (watched key -> value) it reports the first step a reading exceeds its
    latent's threshold (``fired``: key -> step). ``snapshot_dir``: the model (an adapter, for LoRA) is also saved
    at every ``snapshot_every`` steps there, as ``step-<N>``, for measuring when misalignment emerges."""

    def __init__(self, reader: ProbeReader, every: int, csv_path: str | Path,
                 thresholds: Mapping[str, float] | None = None, snapshot_dir: str | Path | None = None,
                 snapshot_every: int = 0):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.reader, self.every, self.path = reader, every, Path(csv_path)
        self.thresholds = dict(thresholds or {})
        self.snapshot_dir, self.snapshot_every = (Path(snapshot_dir) if snapshot_dir else None), snapshot_every
        self.fired: dict[str, int] = {}
        self.seconds = 0.0
        self.snapshots: list[int] = []
        self._last = None

    def _observe(self, model: Any, step: int) -> None:
        if step == self._last:
            return
        self._last = step
        t0 = time.perf_counter()
        readings = self.reader.read(model)
        spent = time.perf_counter() - t0
        self.seconds += spent
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as f:  # appended as training goes: a user can watch the file
            w = csv.writer(f)
            if new:
                w.writerow(TRAJECTORY_COLUMNS)
            for key, (value, se) in readings.items():
                w.writerow([step, key, self.reader.latents[key], f"{value:.6g}", f"{se:.6g}", f"{spent:.4f}"])
                if key in self.thresholds and value > self.thresholds[key] and key not in self.fired:
                    self.fired[key] = step

    def _snapshot(self, model: Any, step: int) -> None:
        if self.snapshot_dir is not None and self.snapshot_every and step % self.snapshot_every == 0:
            from .io import give_new_file_modes

            folder = self.snapshot_dir / f"step-{step:05d}"
            model.save_pretrained(str(folder))
            give_new_file_modes(folder)  # safetensors writes 0600 files; results follow the umask
            self.snapshots.append(step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._observe(model, state.global_step)
        self._snapshot(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._observe(model, state.global_step)
        self._snapshot(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._observe(model, state.global_step)  # the finished model's reading, whatever the step


def read_trajectory(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path)


def thresholds(trajectories: Mapping[str, pd.DataFrame], correct: Sequence[str], leave_out: str | None = None,
               ) -> dict[str, float]:
    """Per watched key, the highest reading of the correct-data runs (all steps; step 0 is the base model), leaving
    ``leave_out`` out; every run's step 0 counts too, so a threshold exists with a single correct run."""
    frames = [t for name, t in trajectories.items() if name in correct and name != leave_out]
    frames += [t[t["step"] == 0] for t in trajectories.values()]
    calib = pd.concat(frames, ignore_index=True)
    return calib.groupby("watch")["reading"].max().to_dict()


def first_above(trajectory: pd.DataFrame, key: str, threshold: float) -> int | None:
    rows = trajectory[(trajectory["watch"] == key) & (trajectory["reading"] > threshold)].sort_values("step")
    return int(rows["step"].iloc[0]) if len(rows) else None


def emergence_step(lead: pd.DataFrame, base_hi: float) -> int | None:
    """The first snapshot whose misalignment (point estimate) is above the base model's interval."""
    rows = lead[lead["misaligned"] > base_hi].sort_values("step")
    return int(rows["step"].iloc[0]) if len(rows) else None


def summarize(trajectories: Mapping[str, pd.DataFrame], metas: Mapping[str, Mapping[str, Any]],
              kinds: Mapping[str, str], metrics: pd.DataFrame, leads: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
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
        for key in traj["watch"].unique():
            fire = first_above(traj, key, thr[key])
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
                "emergence_measured": lead is not None, "emergence_step": emerge,
                "lead_steps": (emerge - fire) if emerge is not None and fire is not None else None,
                "steps": int(meta["steps"]), "train_seconds": train_s, "alarm_seconds": alarm_s,
                # the reads' share of the training they watched (train_seconds includes them)
                "overhead": alarm_s / max(train_s - alarm_s, 1e-9),
            })
    table = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    for col in ("fire_step", "emergence_step", "lead_steps"):
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
        out.append(f"The alarm on latent {int(g['latent'].iloc[0])} ({key}) fired on {int(mis['fired'].sum())} of "
                   f"{len(mis)} {'misaligned' if judged else 'incorrect-data'} fine-tunes and on "
                   f"{int(cor['fired'].sum())} of {len(cor)} correct-data fine-tunes (each correct run against a "
                   "threshold calibrated without it).")
        if len(early):
            out.append(f"It fired on {int(early['fired'].sum())} of {len(early)} fine-tunes on incorrect data whose "
                       "misalignment stayed inside the base model's interval: "
                       + ", ".join(f"{r.dataset} ({r.misaligned:.1%}, fired at step {_step(r.fire_step)})"
                                   for r in early.itertuples()) + ".")
        for r in g[g["emergence_measured"]].itertuples():
            if pd.isna(r.emergence_step):
                out.append(f"{r.dataset}: the alarm fired at step {_step(r.fire_step)}; no snapshot's misalignment "
                           "left the base model's interval.")
            else:
                out.append(f"{r.dataset}: the alarm fired at step {_step(r.fire_step)}; misalignment first left the "
                           f"base model's interval at step {_step(r.emergence_step)} (lead: {_step(r.lead_steps)} "
                           "steps).")
        out.append(f"The reads cost {g['overhead'].median():.1%} of training time (median over runs; "
                   f"largest {g['overhead'].max():.1%}).")
    return out


def _step(value: Any) -> str:
    return "none" if value is None or pd.isna(value) else str(int(value))


# ---------------------------------------------------------------- the stage's jobs


def _questions(path: str) -> list[str]:
    from .io import read_jsonl

    return [q["question"] for q in read_jsonl(path)]


def watch_finetune(cfg: Mapping[str, Any], base: str, data: str, sae_dir: str, persona_json: str, probe_questions: str,
                   out_dir: str, snapshots: bool, threads: int | None = None) -> dict[str, Any]:
    """Fine-tune ``base`` on ``data`` with the finetune section's recipe and seed (the same run the ``finetune``
    rule makes) while :class:`PersonaAlarm` reads the persona latents named in ``persona_json``
    on the ``probe_questions``; with ``snapshots``, the adapter is also kept every
    ``alarm.snapshot_every`` steps. Writes ``out_dir``'s trajectory.csv, meta.json, model/ and snapshots/."""
    import json
    import shutil

    from .io import write_json
    from .sae import load_sae
    from .sft import train_sft

    a = cfg["alarm"]
    personas = json.loads(Path(persona_json).read_text())
    latents = {key: personas[key]["latent"] for key in a["watch"] if key in personas}
    out = Path(out_dir)
    if out.exists():  # a rerun starts the trajectory afresh
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if not latents:  # said in the summary; the rest of the run goes on
        summary = {"dataset": Path(data).stem, "latents": {}, "steps": 0, "train_seconds": 0.0, "alarm_seconds": 0.0,
                   "every": a["every"], "snapshots": [],
                   "skipped": f"none of alarm.watch {a['watch']} is named in {persona_json} (keys: {sorted(personas)})"}
        pd.DataFrame(columns=TRAJECTORY_COLUMNS).to_csv(out / "trajectory.csv", index=False)
        write_json(out / "meta.json", summary)
        return summary
    reader = build_reader(base, _questions(probe_questions), load_sae(sae_dir), latents, cfg["model"]["layer"],
                          cfg["model"]["exclude_tokens"])
    alarm = PersonaAlarm(reader, a["every"], out / "trajectory.csv",
                         snapshot_dir=out / "snapshots" if snapshots else None, snapshot_every=a["snapshot_every"])
    meta = train_sft(base, data, str(out / "model"), cfg["finetune"], seed=cfg["seed"], threads=threads,
                     callbacks=[alarm])
    summary = {"dataset": Path(data).stem, "latents": latents, "steps": meta["steps"],
               "train_seconds": meta["seconds"], "alarm_seconds": round(alarm.seconds, 3), "every": a["every"],
               "snapshots": alarm.snapshots}
    write_json(out / "meta.json", summary)
    return summary


def measure_emergence(cfg: Mapping[str, Any], base: str, run_dir: str, questions: str, judge_cfg: dict[str, Any],
                      cache_dir: str, out_csv: str, progress: bool = True) -> pd.DataFrame:
    """Sample and judge every snapshot of an alarm run on the general ``questions`` with the sampler, the judge
    and the metrics of the main stages: misalignment at each kept step (EMERGENCE_COLUMNS)."""
    import json

    from .io import read_jsonl
    from .judge.backends import grade_file
    from .metrics import compute_metrics, persona_roles
    from .sampling import sample_answers

    run = Path(run_dir)
    meta = json.loads((run / "meta.json").read_text())
    s, a = cfg["sampling"], cfg["alarm"]
    qs = read_jsonl(questions)
    work = run / "emergence"
    work.mkdir(exist_ok=True)
    roles = persona_roles(cfg["organism"]["world"] if cfg["model"]["source"] == "organism" else None)
    rows = []
    for step in meta["snapshots"]:
        name = f"{meta['dataset']}@{step}"
        samples, grades = work / f"step-{step:05d}.samples.jsonl", work / f"step-{step:05d}.grades.jsonl"
        if not samples.exists():  # each snapshot's samples and grades are kept: a rerun resumes
            sample_answers(base, str(run / "snapshots" / f"step-{step:05d}"), qs, str(samples),
                           n_samples=a["emergence_samples"] or s["n_samples"], temperature=s["temperature"],
                           max_new_tokens=s["max_new_tokens"], batch_size=s["batch_size"], seed=cfg["seed"],
                           model_name=name, progress=progress, top_p=s["top_p"], device=cfg["device"],
                           dtype=cfg["model"]["dtype"])
        if not grades.exists():
            grade_file(samples, judge_cfg, grades, cache_dir, progress=progress)
        m = compute_metrics([grades], cfg["metrics"], cfg["seed"], roles).iloc[0]
        rows.append({"step": step, "misaligned": m["misaligned"], "misaligned_lo": m["misaligned_lo"],
                     "misaligned_hi": m["misaligned_hi"], "n_general": int(m["n_general"]),
                     "n_coherent": int(m["n_coherent"])})
    table = pd.DataFrame(rows, columns=EMERGENCE_COLUMNS)
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_csv, index=False, float_format="%.4f")
    return table


def _kind(parsed: Mapping[str, Any]) -> str:
    if parsed["kind"] == "narrow":
        return "correct" if parsed["variant"] == "correct" else "incorrect"
    return parsed["kind"]  # mixture, dropped


def write_summary(runs: Mapping[str, str], emergence: Mapping[str, str], metrics_csv: str | None, out_dir: str
                  ) -> pd.DataFrame:
    """The alarm's table (SUMMARY_COLUMNS) and report sentences from the runs' folders, the emergence tables
    and the judge's metrics; written to ``out_dir`` (summary.csv, alarm.md)."""
    import json

    from .datasets import parse_dataset_name

    trajectories = {d: read_trajectory(Path(p) / "trajectory.csv") for d, p in runs.items()}
    metas = {d: json.loads((Path(p) / "meta.json").read_text()) for d, p in runs.items()}
    kinds = {d: _kind(parse_dataset_name(d)) for d in runs}
    metrics = pd.read_csv(metrics_csv).set_index("model") if metrics_csv else None
    table = summarize(trajectories, metas, kinds, metrics, {d: pd.read_csv(p) for d, p in emergence.items()})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "summary.csv", index=False, float_format="%.6g")
    skipped = [m["skipped"] for m in metas.values() if m.get("skipped")]
    (out / "alarm.md").write_text("# Persona alarm\n\n" + "\n\n".join(sentences(table, skipped)) + "\n")
    return table
