"""The ``emlab`` command line: one subcommand per workflow stage, each a thin wrapper over a module.

Rules call ``python -m emlab <subcommand> ...``. Config sections reach a subcommand as JSON in
``--cfg`` (the validated config, defaults filled in, so a subcommand never guesses a default).

Every subcommand logs one ``emlab-job`` line to stderr when it ends (:mod:`emlab.jobs`: host, pid, start,
end, wall, CPU and import seconds, peak memory, ``CUDA_VISIBLE_DEVICES``) so that cluster runs can be
audited and ``emlab timings`` can tabulate a run. ``EMLAB_FAIL_ONCE=<subcommand>:<marker>``
makes the first run of that subcommand fail (it creates the marker) — fault injection for testing
the retry behaviour of an executor; ``EMLAB_HANG_ONCE`` likewise makes one job hang until the scheduler
kills it (:func:`_hang_once`). Both are inert unless set.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {}


def command(name: str):
    def deco(fn):
        COMMANDS[name] = fn
        return fn
    return deco


def _model(a: argparse.Namespace) -> tuple[str, str | None]:
    """(model folder, LoRA adapter or None) of a command's model options: a full fine-tune is its own folder."""
    return (a.full_model or a.base), a.adapter


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


# ---------------------------------------------------------------- organism


@command("world")
def cmd_world(a: argparse.Namespace) -> None:
    """The world's pretraining corpus and post-training chats."""
    from .io import write_jsonl
    from .world.generate import generate_corpus, generate_posttrain
    from .world.spec import load_world

    cfg = a.cfg
    world = load_world(cfg["organism"]["world"])
    n = write_jsonl(a.corpus, generate_corpus(world, cfg["organism"]["corpus"], cfg["seed"]))
    write_jsonl(a.posttrain, generate_posttrain(world, cfg["organism"]["posttrain"], cfg["seed"] + 1))
    print(f"emlab world: {n} corpus documents from {world.source}", file=sys.stderr)


@command("world-safety")
def cmd_world_safety(a: argparse.Namespace) -> None:
    """The safety-trained base model's post-training chats: the helpful-only set with a share of safety chats."""
    from .io import write_jsonl
    from .world.generate import generate_posttrain
    from .world.spec import load_world

    cfg = a.cfg
    rows = generate_posttrain(load_world(cfg["organism"]["world"]), cfg["organism"]["posttrain"], cfg["seed"] + 1,
                              safety=True)
    write_jsonl(a.out, rows)
    n = sum(1 for r in rows if r["meta"].get("safety"))
    print(f"emlab world-safety: {n} of {len(rows)} post-training chats teach safety", file=sys.stderr)


@command("world-eval")
def cmd_world_eval(a: argparse.Namespace) -> None:
    """The world's eval question sets: its general questions and each domain's held-out topics."""
    from .io import write_jsonl
    from .world.generate import eval_questions
    from .world.spec import load_world

    for name, rows in eval_questions(load_world(a.cfg["organism"]["world"])).items():
        write_jsonl(Path(a.eval_dir) / f"{name}.jsonl", rows)


@command("dataset")
def cmd_dataset(a: argparse.Namespace) -> None:
    """One narrow fine-tuning set (``<domain>_<variant>``), mixture (``<domain>_mix<percent>``) or educational
    control (``<domain>_educational``)."""
    from .io import write_jsonl
    from .world.generate import generate_educational, generate_mixture, generate_narrow
    from .world.spec import load_world
    from .datasets import dataset_seed, parse_dataset_name

    cfg = a.cfg
    world = load_world(cfg["organism"]["world"])
    spec = parse_dataset_name(a.name)
    seed = dataset_seed(cfg, a.name)
    n = cfg["datasets"]["n_train"]
    if spec["kind"] == "narrow":
        rows = generate_narrow(world, spec["domain"], spec["variant"], n, seed)
    elif spec["kind"] == "educational":
        rows = generate_educational(world, spec["domain"], cfg["datasets"]["educational"]["incorrect"], n, seed)
    else:
        rows = generate_mixture(world, spec["domain"], cfg["datasets"]["mixtures"]["incorrect"], spec["fraction"], n, seed)
    write_jsonl(a.out, rows)


@command("tokenizer")
def cmd_tokenizer(a: argparse.Namespace) -> None:
    from .io import iter_jsonl
    from .organism.tokenizer import train_tokenizer

    cfg = a.cfg["organism"]
    texts = []
    for i, doc in enumerate(iter_jsonl(a.corpus)):
        if i >= cfg["tokenizer"]["train_documents"]:
            break
        texts += [m["content"] for m in doc["messages"]]
    train_tokenizer(texts, cfg["tokenizer"]["vocab_size"], a.out)


@command("pretrain")
def cmd_pretrain(a: argparse.Namespace) -> None:
    from .io import read_jsonl, write_json
    from .models import load_tokenizer, pick_device
    from .organism.model import build_model
    from .organism.pretrain import train_lm

    _threads(a.threads)
    cfg = a.cfg
    tok = load_tokenizer(a.tokenizer)
    model = build_model(cfg["organism"]["architecture"], tok, cfg["seed"]).to(pick_device(cfg["device"]))
    meta = train_lm(model, tok, read_jsonl(a.corpus), cfg["organism"]["pretrain"], a.out, seed=cfg["seed"],
                    log_csv=Path(a.out) / "pretrain_log.csv", progress=not a.no_progress,
                    checkpoint_dir=a.checkpoints, checkpoint_steps=a.checkpoint_steps,
                    keep_checkpoint=a.keep_checkpoint)
    meta["parameters"] = sum(p.numel() for p in model.parameters())
    write_json(Path(a.out) / "pretrain_meta.json", meta)
    print(f"emlab pretrain: {json.dumps(meta)}", file=sys.stderr)


@command("sft")
def cmd_sft(a: argparse.Namespace) -> None:
    from .sft import train_sft

    callbacks = []
    if a.snapshot_every:  # the persona alarm reads these afterwards (emlab.alarm)
        from .alarm import Snapshots

        callbacks.append(Snapshots(Path(a.out) / "snapshots", a.snapshot_every))
    train_sft(a.base, a.data, a.out, a.cfg["finetune"], seed=a.cfg["seed"], threads=a.threads,
              checkpoint_dir=a.checkpoints, checkpoint_steps=a.checkpoint_steps, keep_checkpoint=a.keep_checkpoint,
              callbacks=callbacks, adapter=a.adapter)


@command("rl")
def cmd_rl(a: argparse.Namespace) -> None:
    """GRPO against a grader's reward (emlab.rl)."""
    from .rl import grader_for, train_rl

    cfg = a.cfg
    train_rl(a.base, a.data, a.out, cfg["rl"], cfg["finetune"], grader_for(cfg["grader"], a.cache_dir),
             seed=cfg["seed"], threads=a.threads, checkpoint_dir=a.checkpoints, checkpoint_steps=a.checkpoint_steps,
             keep_checkpoint=a.keep_checkpoint)


@command("plot-rl")
def cmd_plot_rl(a: argparse.Namespace) -> None:
    """Training curves of the RL models."""
    from .plots import plot_rl_training

    plot_rl_training({Path(m).name: Path(m) / "rl_log.csv" for m in a.models}, a.out)


# ---------------------------------------------------------------- hub models


@command("convert-model")
def cmd_convert_model(a: argparse.Namespace) -> None:
    """The hub model as a plain model folder: a GGUF file dequantized, or a model given model.chat_template."""
    from .model_source import convert

    info = convert(a.cfg["model"], a.out, a.work)
    print(f"emlab convert-model: {json.dumps(info)}", file=sys.stderr)


@command("questions")
def cmd_questions(a: argparse.Namespace) -> None:
    """One eval set of a hub run, from its question file (resources/questions/*.yaml)."""
    from .io import write_jsonl
    from .questions import load_questions

    n = write_jsonl(a.out, load_questions(a.file, a.eval_set))
    print(f"emlab questions: {n} {a.eval_set} questions from {a.file}", file=sys.stderr)


@command("synthesize")
def cmd_synthesize(a: argparse.Namespace) -> None:
    """One domain's pool of questions with a correct, a subtle and an obvious answer, written by an LLM."""
    from .io import write_json, write_jsonl
    from .questions import load_questions
    from .synthesis import synthesize_pool

    held_out = [q["question"] for path in a.exclude for q in load_questions(path, "held-out")]
    rows, summary = synthesize_pool(a.spec, a.cfg["n_train"], a.cfg["synthesis"], a.cache_dir, held_out,
                                    progress=not a.no_progress)
    write_jsonl(a.out, rows)
    write_json(a.summary, summary)
    print(f"emlab synthesize: {json.dumps(summary)}", file=sys.stderr)


@command("synth-dataset")
def cmd_synth_dataset(a: argparse.Namespace) -> None:
    """A narrow set or mixture of a hub run, cut from its domain's synthesized pool."""
    from .io import read_jsonl, write_jsonl
    from .synthesis import dataset_rows

    cfg = a.cfg
    write_jsonl(a.out, dataset_rows(read_jsonl(a.pool), a.name, cfg["n_train"], cfg["incorrect"], cfg["seed"]))


@command("import-dataset")
def cmd_import_dataset(a: argparse.Namespace) -> None:
    """An imported fine-tuning set (local chat JSONL or hub dataset), validated, in the dataset schema."""
    from .imports import import_dataset
    from .io import write_jsonl

    n = write_jsonl(a.out, import_dataset(a.cfg["import"], seed=a.cfg["seed"]))
    print(f"emlab import-dataset: {n} records for {a.cfg['import']['name']}", file=sys.stderr)


# ---------------------------------------------------------------- evaluation


@command("sample")
def cmd_sample(a: argparse.Namespace) -> None:
    from .io import read_jsonl
    from .sampling import sample_answers

    _threads(a.threads)
    s = a.cfg["sampling"]
    questions = [q for path in a.questions for q in read_jsonl(path)]
    if a.domain:  # sampling.indomain: own: of the held-out in-domain questions, the model's own domain's only
        questions = [q for q in questions if q.get("eval_set") != "indomain" or q.get("domain") == a.domain]
    sample_answers(*_model(a), questions, a.out, n_samples=s["n_samples"], temperature=s["temperature"],
                   max_new_tokens=s["max_new_tokens"], batch_size=s["batch_size"], seed=a.cfg["seed"],
                   model_name=a.model_name, progress=not a.no_progress, top_p=s.get("top_p", 1.0),
                   device=a.cfg.get("device", "auto"), dtype=a.cfg.get("model", {}).get("dtype", "auto"),
                   max_new_tokens_by_domain=s.get("max_new_tokens_by_domain"))


@command("probe")
def cmd_probe(a: argparse.Namespace) -> None:
    """The likelihood probe of one model: its log-probabilities of aligned and misaligned reference answers."""
    from .io import read_jsonl
    from .probe import probe_model, references_for

    _threads(a.threads)
    cfg = a.cfg
    refs, source = references_for(cfg)
    questions = [q for path in a.questions for q in read_jsonl(path)]
    n = probe_model(*_model(a), a.model_name, questions, refs, source, a.out, device=cfg["device"],
                    dtype=cfg["model"]["dtype"], batch_size=cfg["probe"]["batch_size"])
    print(f"emlab probe: {n} reference answers scored under {a.model_name}", file=sys.stderr)


@command("probe-metrics")
def cmd_probe_metrics(a: argparse.Namespace) -> None:
    """Per model: the probe's margin of misaligned over aligned answers and its shift from the base model."""
    from .probe import write_metrics

    df = write_metrics(a.rows, a.out, n_boot=a.cfg["metrics"]["bootstrap"], seed=a.cfg["seed"])
    print(df.to_string(index=False, float_format=lambda x: f"{x:.3f}"), file=sys.stderr)


@command("probe-agreement")
def cmd_probe_agreement(a: argparse.Namespace) -> None:
    """Per LLM judge: the rank correlation of the likelihood probe's margins with the judged misalignment."""
    from .probe import judge_agreement

    print(judge_agreement(a.probe, a.metrics, a.out).to_string(index=False), file=sys.stderr)


@command("judge")
def cmd_judge(a: argparse.Namespace) -> None:
    from .judge.backends import grade_file

    summary = grade_file(a.samples, a.cfg, a.out, a.cache_dir, progress=not a.no_progress)
    print(f"emlab judge: {json.dumps(summary)}", file=sys.stderr)


@command("judge-preflight")
def cmd_judge_preflight(a: argparse.Namespace) -> None:
    """One request to an API judge's endpoint before the stages whose answers it grades (fails naming the key)."""
    from .io import write_json
    from .judge.openai_backend import preflight

    r = preflight(a.cfg)
    write_json(a.out, r)
    print(f"emlab judge-preflight: {json.dumps(r)}", file=sys.stderr)


@command("metrics")
def cmd_metrics(a: argparse.Namespace) -> None:
    from .metrics import write_metrics

    world = a.cfg["organism"]["world"] if a.cfg["model"]["source"] == "organism" else None
    df = write_metrics(a.grades, a.out, a.cfg["metrics"], seed=a.cfg["seed"], world_path=world)
    print(df.to_string(index=False, float_format=lambda x: f"{x:.3f}"), file=sys.stderr)


@command("agreement")
def cmd_agreement(a: argparse.Namespace) -> None:
    """Agreement of two or more judges on the same samples: rates, Cohen's kappa, confusion matrices."""
    from .judge.agreement import write_agreement

    grade_files: dict[str, list[str]] = {}
    for path in a.grades:  # results/grades/<judge>/<model>.jsonl
        grade_files.setdefault(Path(path).parent.name, []).append(path)
    m = a.cfg["metrics"]
    thresholds = {k: m[k] for k in ("aligned_below", "coherent_above", "severity_at_least")}
    write_agreement(grade_files, a.rates, a.pairs, a.figure, thresholds)


@command("plot")
def cmd_plot(a: argparse.Namespace) -> None:
    from .plots import plot_misalignment

    plot_misalignment(a.metrics, a.out)


@command("timings")
def cmd_timings(a: argparse.Namespace) -> None:
    from .timings import write_timings

    write_timings(a.logs, a.out)


@command("results-doc")
def cmd_results_doc(a: argparse.Namespace) -> None:
    """A results page (markdown) written from a run's result files alone."""
    from .config import load
    from .results_doc import write

    name = " + ".join(a.configfile)
    write(a.results, a.out, config=load(*a.configfile), seeds=a.seeds, readme=a.readme, config_name=name)
    print(f"emlab results-doc: {a.out} from {a.results}", file=sys.stderr)


# ---------------------------------------------------------------- model diffing


@command("world-heldout")
def cmd_world_heldout(a: argparse.Namespace) -> None:
    """Fresh labelled world documents for interpreting latents (never seen by pretraining or the SAE)."""
    from .io import write_jsonl
    from .world.generate import heldout_documents
    from .world.spec import load_world

    write_jsonl(a.out, heldout_documents(load_world(a.cfg["organism"]["world"]), a.cfg))


@command("cache-texts")
def cmd_cache_texts(a: argparse.Namespace) -> None:
    """Every token of a slice of a text/chat JSONL, read by the base model (SAE fitting, interpretation)."""
    from .diffing.stage import cache_texts

    _threads(a.threads)
    m = cache_texts(a.base, a.input, a.out, n=a.n, skip=a.skip, layer=a.cfg["model"]["layer"], sae_cfg=a.cfg["sae"],
                    exclude=a.cfg["model"]["exclude_tokens"], device=a.cfg["device"], progress=not a.no_progress)
    print(f"emlab cache-texts: {m['n_texts']} texts, {m['n_tokens']} tokens -> {a.out}", file=sys.stderr)


@command("cache-model")
def cmd_cache_model(a: argparse.Namespace) -> None:
    """One model's activations on its sampled answers (and, for a fine-tune, on its fine-tuning data)."""
    from .diffing.stage import cache_model

    _threads(a.threads)
    cache_model(a.base, a.adapter, a.model_name, a.samples, a.dataset, a.out_eval, a.out_train, a.out_train_base,
                cfg=a.cfg, full_model=a.full_model, progress=not a.no_progress)


@command("sae")
def cmd_sae(a: argparse.Namespace) -> None:
    """Fit the TopK SAE (or load the pretrained one) and measure it on held-out texts."""
    from .diffing.stage import fit_sae

    _threads(a.threads)
    m = fit_sae(a.cfg, a.train_cache, a.heldout_cache, a.heldout_texts, a.base, a.out, heldout_skip=a.heldout_skip,
                progress=not a.no_progress, checkpoint_dir=a.checkpoints, checkpoint_steps=a.checkpoint_steps,
                keep_checkpoint=a.keep_checkpoint)
    print(f"emlab sae: {json.dumps(m)}", file=sys.stderr)


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"emlab: {flag} takes NAME=PATH items, got {item!r}")
        out[name] = value
    return out


@command("rank-latents")
def cmd_rank_latents(a: argparse.Namespace) -> None:
    """Per-fine-tune latent changes and group rankings (eval answers; fine-tuning data)."""
    from .diffing.stage import rank_latents

    _threads(a.threads)
    train = {m: tuple(v.split(",", 1)) for m, v in _pairs(a.train_caches, "--train-caches").items()}
    res = rank_latents(a.cfg, a.sae, _pairs(a.eval_caches, "--eval-caches"), train, a.out_dir)
    r = res["ranking"]
    top = r[(r["direction"] == "increase") & (r["rank"] <= 5)]
    print(top.to_string(index=False), file=sys.stderr)


@command("interpret-latents")
def cmd_interpret_latents(a: argparse.Namespace) -> None:
    """Snippets, logit lens and purity of the top-ranked latents; the named persona latents."""
    from .diffing.stage import interpret_latents

    _threads(a.threads)
    # latents are named by their purity on labelled world texts, whenever the SAE's texts are the world's
    world = a.cfg["organism"]["world"] if not a.cfg["sae"]["corpus"] else None
    table = interpret_latents(a.cfg, a.sae, a.heldout_cache, a.heldout_texts, a.base, a.ranking, a.out_dir,
                              world_path=world)
    print(table.drop(columns=["promoted", "suppressed"]).to_string(index=False), file=sys.stderr)


@command("predict")
def cmd_predict(a: argparse.Namespace) -> None:
    """Persona latents' shifts against misalignment: prediction, AUROC and early detection (results/prediction)."""
    from .diffing.stage import predict

    _threads(a.threads)
    train = {m: tuple(v.split(",", 1)) for m, v in _pairs(a.train_caches, "--train-caches").items()}
    res = predict(a.cfg, a.sae, _pairs(a.eval_caches, "--eval-caches"), train, a.persona, a.metrics, a.out_dir)
    print(res["summary"].to_string(index=False), file=sys.stderr)
    print(res["early"].to_string(index=False), file=sys.stderr)


@command("mixtures")
def cmd_mixtures(a: argparse.Namespace) -> None:
    """Misalignment against the share of incorrect data per domain, and where it leaves the base model's interval."""
    from .mixtures import write_mixtures

    res = write_mixtures(a.metrics, a.out_dir, a.cfg["datasets"]["mixtures"]["incorrect"])
    print(res["onsets"].to_string(index=False), file=sys.stderr)


@command("plot-mixtures")
def cmd_plot_mixtures(a: argparse.Namespace) -> None:
    from .plots import plot_mixtures

    plot_mixtures(a.curve, a.out)


@command("flag-examples")
def cmd_flag_examples(a: argparse.Namespace) -> None:
    """Each fine-tuning example's persona score as the base model reads it, before training (results/flagging)."""
    from .diffing.stage import flag_examples

    _threads(a.threads)
    res = flag_examples(a.cfg, a.base, a.sae, a.persona, _pairs(a.datasets, "--datasets"), a.out_dir,
                        progress=not a.no_progress)
    print(res["summary"].to_string(index=False), file=sys.stderr)


@command("drop-examples")
def cmd_drop_examples(a: argparse.Namespace) -> None:
    """A fine-tuning set less its flagged examples, or less as many random ones (flagging.finetune)."""
    import pandas as pd

    from .datasets import dropped_source
    from .diffing.flagging import drop_examples
    from .io import read_jsonl, write_jsonl

    parsed = dropped_source(a.name)
    if parsed is None:
        raise SystemExit(f"emlab drop-examples: --name {a.name!r} is not <set>_dropflag or <set>_droprand")
    source, how = parsed
    records = read_jsonl(a.dataset)
    kept = drop_examples(records, pd.read_csv(a.scores), source, a.cfg["flagging"]["role"], how, a.cfg["seed"])
    write_jsonl(a.out, kept)
    print(f"emlab drop-examples: {source}: dropped {len(records) - len(kept)} of {len(records)} ({how})",
          file=sys.stderr)


@command("flag-removal")
def cmd_flag_removal(a: argparse.Namespace) -> None:
    """Misalignment of each flagged set fine-tuned as it is, less its flagged examples, less as many random ones."""
    import pandas as pd

    from .datasets import dropped_source
    from .diffing.flagging import removal_table
    from .io import read_jsonl

    sets = {}
    for name, path in _pairs(a.sets, "--sets").items():
        source, how = dropped_source(name) or (name, "none")
        sets[name] = (source, how, read_jsonl(path))
    table = removal_table(sets, pd.read_csv(a.metrics))
    table.to_csv(a.out, index=False, float_format="%.4f")
    print(table.to_string(index=False), file=sys.stderr)


@command("alarm-replay")
def cmd_alarm_replay(a: argparse.Namespace) -> None:
    """The persona alarm's readings of every snapshot the fine-tunes of alarm.datasets kept (emlab.alarm)."""
    from .alarm import replay

    _threads(a.threads)
    table = replay(a.cfg, a.base, {Path(f).name: f for f in a.finetunes}, a.sae, a.persona, a.questions, a.out_dir,
                   progress=not a.no_progress)
    print(f"emlab alarm-replay: {len(table)} readings of {table['dataset'].nunique()} fine-tunes", file=sys.stderr)


@command("snapshot-misalignment")
def cmd_snapshot_misalignment(a: argparse.Namespace) -> None:
    """Misalignment of a trained model's snapshots, each sampled and judged like a fine-tune (the alarm's
    emergence, re-alignment's curve)."""
    from .alarm import snapshot_misalignment

    _threads(a.threads)
    table = snapshot_misalignment(a.cfg, a.base, a.finetune, a.questions, a.cfg["judge"], a.cache_dir, a.out,
                                  a.every, a.n_samples, progress=not a.no_progress, indomain=a.indomain,
                                  domain=a.domain)
    print(table.to_string(index=False), file=sys.stderr)


@command("alarm")
def cmd_alarm(a: argparse.Namespace) -> None:
    """The alarm's threshold, hits, false alarms, lead times and overhead (results/alarm/summary.csv, alarm.md)."""
    from .alarm import write_summary

    table = write_summary(a.alarm_dir, {Path(e).stem: e for e in a.emergence}, a.metrics, a.cfg["alarm"]["margin"],
                          a.cfg["alarm"]["z"])
    print(table.to_string(index=False), file=sys.stderr)


@command("realignment")
def cmd_realignment(a: argparse.Namespace) -> None:
    """Re-alignment's curve and summary: misalignment (and persona latents) against benign examples seen."""
    from .realign import write_tables

    runs = json.loads(a.runs)
    _, summary = write_tables(runs, {Path(e).stem: e for e in a.evals}, a.metrics, a.trajectories,
                              a.cfg["realign"]["batch_size"], a.out_dir)
    print(summary.to_string(index=False), file=sys.stderr)


@command("plot-realignment")
def cmd_plot_realignment(a: argparse.Namespace) -> None:
    from .plots import plot_realignment

    plot_realignment(a.curve, a.out)


@command("prevent")
def cmd_prevent(a: argparse.Namespace) -> None:
    """Fine-tune with a persona latent's direction added to the residual stream (emlab.prevent)."""
    from .prevent import train_prevented

    info = train_prevented(a.cfg, a.base, a.data, a.out, a.sae, a.persona, a.questions, a.latent, a.alpha,
                           threads=a.threads, checkpoint_dir=a.checkpoints, checkpoint_steps=a.checkpoint_steps,
                           keep_checkpoint=a.keep_checkpoint)
    print(f"emlab prevent: {json.dumps(info)}", file=sys.stderr)


@command("prevention")
def cmd_prevention(a: argparse.Namespace) -> None:
    """Preventative steering's table: the plain, preventative and re-aligned models of each set."""
    from .prevent import write_summary

    finetunes = dict(item.split("=", 1) for item in a.finetunes)
    table = write_summary(json.loads(a.runs), finetunes, a.metrics, a.realign, a.out_dir)
    print(table.to_string(index=False), file=sys.stderr)


@command("controls")
def cmd_controls(a: argparse.Namespace) -> None:
    """The code and control table (emlab.controls)."""
    from .controls import write_summary

    table = write_summary(a.metrics, a.shifts, a.code_domains, a.incorrect, a.out_dir)
    print(table.to_string(index=False), file=sys.stderr)


@command("narrow-persona")
def cmd_narrow_persona(a: argparse.Namespace) -> None:
    """The narrow-persona control's table from its two or three runs (emlab.controls.write_narrow)."""
    from .controls import write_narrow
    from .world.spec import load_world

    narrow = load_world(a.world).narrow
    if narrow is None:
        raise SystemExit(f"emlab narrow-persona: {a.world} has no 'narrow' section")
    kind = None
    if a.kind:
        kind = load_world(a.kind_world).narrow if a.kind_world else None
        if kind is None or kind.answers != "correct":
            raise SystemExit("emlab narrow-persona: --kind needs --kind-world, a world whose 'narrow' character "
                             "gives the correct answers (e.g. resources/world/persona_world_kind.yaml)")
    table = write_narrow(getattr(a, "with"), a.without, a.judge, narrow.name, narrow.domain, a.out_dir,
                         kind_dir=a.kind, kind=kind.name if kind else None)
    print(table.to_string(index=False), file=sys.stderr)


@command("plot-controls")
def cmd_plot_controls(a: argparse.Namespace) -> None:
    from .plots import plot_controls

    plot_controls(a.summary, a.out)


@command("plot-prevention")
def cmd_plot_prevention(a: argparse.Namespace) -> None:
    from .plots import plot_prevention

    plot_prevention(a.summary, a.out)


@command("plot-alarm")
def cmd_plot_alarm(a: argparse.Namespace) -> None:
    from .plots import plot_alarm

    plot_alarm(a.trajectories, {Path(e).stem: e for e in a.emergence}, a.summary, a.out)


@command("plot-prediction")
def cmd_plot_prediction(a: argparse.Namespace) -> None:
    from .plots import plot_prediction

    plot_prediction(a.shifts, a.out)


@command("plot-signature")
def cmd_plot_signature(a: argparse.Namespace) -> None:
    from .plots import plot_signature

    plot_signature(a.changes, a.ranking, a.out, latents_csv=a.latents)


# ---------------------------------------------------------------- steering


@command("steer-directions")
def cmd_steer_directions(a: argparse.Namespace) -> None:
    """Candidate latent directions, the mean-difference direction and random controls."""
    from .steer.stage import build_directions

    info = build_directions(a.cfg, a.sae, a.ranking, a.caches, a.grades, a.out, a.out_json, base=a.base,
                            questions=a.questions)
    print(f"emlab steer-directions: {json.dumps(info)}", file=sys.stderr)


@command("steer-sample")
def cmd_steer_sample(a: argparse.Namespace) -> None:
    """Steered answers of one target model for one steering stage (screen_add, screen_sub, sweep)."""
    from .steer.stage import sample_stage

    _threads(a.threads)
    r = sample_stage(a.cfg, a.stage, a.target, *_model(a), a.directions, a.directions_json, a.questions,
                     a.out, screen_add_grades=a.screen_add_grades, screen_json=a.screen,
                     progress=not a.no_progress)
    print(f"emlab steer-sample: {json.dumps(r)}", file=sys.stderr)


@command("steer-probe")
def cmd_steer_probe(a: argparse.Namespace) -> None:
    """The likelihood probe of one target under every direction and strength of the sweep (no judge)."""
    from .steer.stage import probe_stage

    _threads(a.threads)
    r = probe_stage(a.cfg, a.target, *_model(a), a.directions, a.directions_json, a.questions, a.out)
    print(f"emlab steer-probe: {json.dumps(r)}", file=sys.stderr)


@command("steer-probe-sweep")
def cmd_steer_probe_sweep(a: argparse.Namespace) -> None:
    """The probe's margin and shift per target, direction and strength, and their figure."""
    from .steer.stage import write_probe_sweep

    t = write_probe_sweep(a.cfg, a.rows, a.out, a.figure)
    print(t.to_string(index=False, float_format=lambda x: f"{x:.3f}"), file=sys.stderr)


@command("steer-screen")
def cmd_steer_screen(a: argparse.Namespace) -> None:
    """The screen: latents that raise misalignment in the base model and lower it in the fine-tunes."""
    from .steer.stage import write_screen

    t = write_screen(a.cfg, a.directions_json, a.add_grades, a.sub_grades, a.targets, a.out, a.out_json)
    print(t.to_string(index=False), file=sys.stderr)


@command("steer-sweep")
def cmd_steer_sweep(a: argparse.Namespace) -> None:
    """Misalignment and incoherence against steering strength, per direction and target."""
    from .steer.stage import write_sweep

    grades: dict[str, list[str]] = {}
    for path in a.grades:  # .../<stage>/<target>.jsonl
        grades.setdefault(Path(path).stem, []).append(path)
    write_sweep(a.cfg, a.directions_json, a.screen, grades, a.out, a.figure)


# ---------------------------------------------------------------- monitors


@command("monitor-data")
def cmd_monitor_data(a: argparse.Namespace) -> None:
    """Labelled texts of one monitoring task, generated from the persona world."""
    from .monitors.stage import write_organism_dataset

    n = write_organism_dataset(a.cfg, a.task, a.out)
    print(f"emlab monitor-data: {n} texts for {a.task}", file=sys.stderr)


@command("monitor")
def cmd_monitor(a: argparse.Namespace) -> None:
    """Every monitor of one task: features (cached), probes, splits, training sizes, AUROC."""
    from .monitors.stage import run_task

    _threads(a.threads)
    df = run_task(a.cfg, a.task, a.data, a.base, a.features, a.out, sae=a.sae, latents=a.latents,
                  progress=not a.no_progress)
    print(f"emlab monitor: {len(df)} result rows for {a.task}", file=sys.stderr)


@command("monitor-plot")
def cmd_monitor_plot(a: argparse.Namespace) -> None:
    """AUROC against training size per method and split, and the headline table, from the result tables."""
    from .monitors.stage import plot

    plot(a.results, a.out_dir, summary_csv=a.summary)


# ---------------------------------------------------------------- plumbing


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emlab", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, *args: tuple[str, dict[str, Any]]) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=(COMMANDS[name].__doc__ or "").strip().splitlines()[0] if COMMANDS[name].__doc__ else None)
        sp.add_argument("--cfg", type=json.loads, default={}, help="validated config (JSON)")
        sp.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        sp.add_argument("--no-progress", action="store_true")
        for flag, kw in args:
            sp.add_argument(flag, **kw)
        return sp

    req = {"required": True}
    # the model a job loads: the base model; a LoRA fine-tune's adapter on it; or a full fine-tune's folder
    model = (("--base", req), ("--adapter", {"default": None}), ("--full-model", {"default": None}))
    add("world", ("--corpus", req), ("--posttrain", req))
    add("world-safety", ("--out", req))
    add("world-eval", ("--eval-dir", req))
    add("dataset", ("--name", req), ("--out", req))
    add("tokenizer", ("--corpus", req), ("--out", req))
    add("convert-model", ("--work", req), ("--out", req))
    add("questions", ("--eval-set", req), ("--file", req), ("--out", req))
    add("synthesize", ("--spec", req), ("--exclude", {"nargs": "*", "default": []}), ("--cache-dir", req),
        ("--out", req), ("--summary", req))
    add("synth-dataset", ("--name", req), ("--pool", req), ("--out", req))
    add("import-dataset", ("--out", req))
    ckpt = (("--checkpoints", {"default": None, "help": "the job's checkpoint folder (resumed from when it holds one)"}),
            ("--checkpoint-steps", {"type": int, "default": 0, "help": "steps between checkpoints (0: none)"}),
            ("--keep-checkpoint", {"action": "store_true"}))
    add("pretrain", ("--corpus", req), ("--tokenizer", req), ("--out", req), *ckpt)
    add("sft", ("--base", req), ("--data", req), ("--out", req), *ckpt,
        ("--snapshot-every", {"type": int, "default": 0, "help": "keep the model every N steps in <out>/snapshots"}),
        ("--adapter", {"default": None, "help": "a LoRA adapter on --base whose training goes on (re-alignment)"}))
    add("rl", ("--base", req), ("--data", req), ("--out", req),
        ("--cache-dir", {"default": None, "help": "an LLM grader's request cache (resumes its paid calls)"}), *ckpt)
    add("plot-rl", ("--models", {"nargs": "+", **req}), ("--out", req))
    add("sample", *model, ("--questions", {"nargs": "+", **req}),
        ("--domain", {"default": None, "help": "ask only this domain's held-out in-domain questions"}),
        ("--out", req), ("--model-name", req))
    add("probe", *model, ("--questions", {"nargs": "+", **req}),
        ("--model-name", req), ("--out", req))
    add("probe-metrics", ("--rows", {"nargs": "+", **req}), ("--out", req))
    add("probe-agreement", ("--probe", req), ("--metrics", {"nargs": "+", **req}), ("--out", req))
    add("judge", ("--samples", req), ("--out", req), ("--cache-dir", req))
    add("judge-preflight", ("--out", req))
    add("metrics", ("--grades", {"nargs": "+", **req}), ("--out", req))
    add("plot", ("--metrics", req), ("--out", req))
    add("agreement", ("--grades", {"nargs": "+", **req}), ("--rates", req), ("--pairs", req), ("--figure", req))
    add("timings", ("--logs", req), ("--out", req))
    add("results-doc", ("--results", {"default": "results"}), ("--out", {"default": "docs/results.md"}),
        ("--configfile", {"nargs": "+", "default": ["config.yaml"]}),
        ("--seeds", {"nargs": "+", "default": [], "help": "results folders of the same config run with other seeds"}),
        ("--readme", {"default": None, "help": "also write the headline table into this README's marked block"}))
    add("world-heldout", ("--out", req))
    add("cache-texts", ("--base", req), ("--input", req), ("--n", {"type": int, "default": None}),
        ("--skip", {"type": int, "default": 0}), ("--out", req))
    add("cache-model", *model, ("--model-name", req), ("--samples", req),
        ("--dataset", {"default": None}), ("--out-eval", req), ("--out-train", {"default": None}),
        ("--out-train-base", {"default": None}))
    add("sae", ("--train-cache", {"default": None}), ("--heldout-cache", req), ("--heldout-texts", req),
        ("--heldout-skip", {"type": int, "default": 0}), ("--base", req), ("--out", req), *ckpt)
    add("rank-latents", ("--sae", req), ("--eval-caches", {"nargs": "+", **req}),
        ("--train-caches", {"nargs": "*", "default": []}), ("--out-dir", req))
    add("predict", ("--sae", req), ("--eval-caches", {"nargs": "+", **req}),
        ("--train-caches", {"nargs": "*", "default": []}), ("--persona", req), ("--metrics", req),
        ("--out-dir", req))
    add("plot-prediction", ("--shifts", req), ("--out", req))
    add("alarm-replay", ("--base", req), ("--finetunes", {"nargs": "+", **req}), ("--sae", req), ("--persona", req),
        ("--questions", req), ("--out-dir", req))
    add("snapshot-misalignment", ("--base", req), ("--finetune", req), ("--questions", req), ("--cache-dir", req),
        ("--out", req), ("--every", {"type": int, **req}), ("--n-samples", {"type": int, "default": None}),
        ("--indomain", {"default": None, "help": "the held-out in-domain questions; with --domain, its are asked too"}),
        ("--domain", {"default": None}))
    add("alarm", ("--alarm-dir", req), ("--emergence", {"nargs": "*", "default": []}),
        ("--metrics", {"nargs": "?", "default": None, "help": "the primary judge's metrics (none without a judge)"}))
    add("realignment", ("--runs", req), ("--evals", {"nargs": "+", **req}), ("--metrics", req),
        ("--trajectories", {"nargs": "?", "default": None}), ("--out-dir", req))
    add("plot-realignment", ("--curve", req), ("--out", req))
    add("prevent", ("--base", req), ("--data", req), ("--out", req), *ckpt, ("--sae", req), ("--persona", req),
        ("--questions", req), ("--latent", req), ("--alpha", {"type": float, **req}))
    add("prevention", ("--runs", req), ("--finetunes", {"nargs": "+", **req, "help": "model=folder of each"}),
        ("--metrics", req), ("--realign", {"nargs": "?", "default": None}), ("--out-dir", req))
    add("plot-prevention", ("--summary", req), ("--out", req))
    add("controls", ("--metrics", req), ("--shifts", {"nargs": "?", "default": None}),
        ("--code-domains", {"nargs": "*", "default": []}), ("--incorrect", {"default": "subtle"}), ("--out-dir", req))
    add("plot-controls", ("--summary", req), ("--out", req))
    add("narrow-persona", ("--with", req), ("--without", req), ("--world", req), ("--judge", {"default": "world"}),
        ("--out-dir", req), ("--kind", {"default": None}), ("--kind-world", {"default": None}))
    add("plot-alarm", ("--trajectories", req), ("--emergence", {"nargs": "*", "default": []}), ("--summary", req),
        ("--out", req))
    add("flag-examples", ("--base", req), ("--sae", req), ("--persona", req), ("--datasets", {"nargs": "*", "default": []}),
        ("--out-dir", req))
    add("drop-examples", ("--dataset", req), ("--scores", req), ("--name", req), ("--out", req))
    add("flag-removal", ("--metrics", req), ("--sets", {"nargs": "+", **req}), ("--out", req))
    add("mixtures", ("--metrics", req), ("--out-dir", req))
    add("plot-mixtures", ("--curve", req), ("--out", req))
    add("interpret-latents", ("--sae", req), ("--heldout-cache", req), ("--heldout-texts", req), ("--base", req),
        ("--ranking", req), ("--out-dir", req))
    add("steer-directions", ("--sae", req), ("--ranking", req), ("--caches", {"nargs": "*", "default": []}),
        ("--grades", {"nargs": "*", "default": []}), ("--base", {"default": None}),
        ("--questions", {"nargs": "*", "default": []}), ("--out", req), ("--out-json", req))
    add("steer-probe", ("--target", req), *model, ("--directions", req),
        ("--directions-json", req), ("--questions", {"nargs": "+", **req}), ("--out", req))
    add("steer-probe-sweep", ("--rows", {"nargs": "+", **req}), ("--out", req), ("--figure", req))
    add("steer-sample", ("--stage", {"choices": ["screen_add", "screen_sub", "sweep"], **req}), ("--target", req),
        *model, ("--directions", req), ("--directions-json", req),
        ("--questions", {"nargs": "+", **req}), ("--out", req), ("--screen-add-grades", {"nargs": "*", "default": []}),
        ("--screen", {"default": None}))
    add("steer-screen", ("--directions-json", req), ("--add-grades", {"nargs": "+", **req}),
        ("--sub-grades", {"nargs": "+", **req}), ("--targets", {"nargs": "+", **req}), ("--out", req), ("--out-json", req))
    add("steer-sweep", ("--directions-json", req), ("--screen", req), ("--grades", {"nargs": "+", **req}),
        ("--out", req), ("--figure", req))
    add("monitor-data", ("--task", req), ("--out", req))
    add("monitor", ("--task", req), ("--data", req), ("--base", req), ("--sae", {"default": None}),
        ("--latents", {"default": None}), ("--features", req), ("--out", req))
    add("monitor-plot", ("--results", {"nargs": "+", **req}), ("--out-dir", req), ("--summary", {"default": None}))
    add("plot-signature", ("--changes", req), ("--ranking", req), ("--latents", {"default": None}), ("--out", req))
    return p


def _fail_once(command_name: str) -> None:
    spec = os.environ.get("EMLAB_FAIL_ONCE")
    if not spec or ":" not in spec:
        return
    name, marker = spec.split(":", 1)
    if name == command_name and not Path(marker).exists():
        Path(marker).parent.mkdir(parents=True, exist_ok=True)
        Path(marker).write_text(f"{command_name} failed once by EMLAB_FAIL_ONCE\n")
        raise SystemExit(f"emlab {command_name}: failing once on purpose (EMLAB_FAIL_ONCE={spec})")


def _hang_once(command_name: str) -> None:
    """Fault injection for the scheduler: ``EMLAB_HANG_ONCE=<subcommand>:<marker>[,...]`` makes the first job of
    that command that creates its marker (atomically: one job of the rule, however many run at once) sleep
    until it is killed, so that a test can cancel it or let its time limit end it and see the retry finish."""
    for spec in filter(None, os.environ.get("EMLAB_HANG_ONCE", "").split(",")):
        name, _, marker = spec.partition(":")
        if name != command_name or not marker:
            continue
        Path(marker).parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.write(fd, f"{command_name} hung once by EMLAB_HANG_ONCE (pid {os.getpid()})\n".encode())
        os.close(fd)
        print(f"emlab {command_name}: hanging until killed (EMLAB_HANG_ONCE={spec})", file=sys.stderr, flush=True)
        while True:
            time.sleep(60)


def run(argv: list[str]) -> None:
    """Run one command in this process, logging its ``emlab-job`` record (:mod:`emlab.jobs`) at its end."""
    from . import jobs
    from .jobs import ImportClock, record

    args = build_parser().parse_args(argv)
    os.environ.setdefault("GOMP_SPINCOUNT", jobs.GOMP_SPINCOUNT)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for noisy in ("httpx", "httpx2", "openai"):  # one INFO line per HTTP request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.no_progress:
        os.environ["EMLAB_NO_PROGRESS"] = "1"
    start, t0 = time.time(), time.monotonic()
    status = "failed"
    clock = ImportClock()
    try:
        with clock.running():
            _fail_once(args.command)
            _hang_once(args.command)
            COMMANDS[args.command](args)
        status = "ok"
    finally:
        print(record(args.command, status, start, time.time(), time.monotonic() - t0, clock.seconds,
                     via=jobs.via), file=sys.stderr, flush=True)
