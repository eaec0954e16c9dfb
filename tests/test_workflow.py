"""The reduced organism DAG end to end through real Snakemake: outputs, schemas, reruns, config errors."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from emlab.datasets import dataset_seed
from emlab.io import read_jsonl
from emlab.judge.schema import GRADE_FIELDS, SAMPLE_KEYS
from emlab.world.generate import generate_narrow
from emlab.world.spec import load_world
from workflow_runner import copy_workflow, job_counts, snakemake

TINY = "tests/configs/tiny.yaml"
FINETUNES = ["health_correct", "health_subtle", "health_mix050", "code_educational"]
# GRPO on health_correct's questions with the incorrect reward, from the helpful-only and the safety-trained base
RL_MODELS = ["rl_health_incorrect", "rl_safe_health_incorrect"]
# the mixture less its flagged examples and less as many random ones (flagging.finetune): fine-tuned, sampled and
# judged like the others, but not diffed (their examples were picked by the persona latents diffing names)
DROPPED = ["health_mix050_dropflag", "health_mix050_droprand"]
# fine-tuned with a direction added (emlab.prevent: the subtle group's latent, a random one)
PREVENTED = ["health_subtle_prevent_subtle_1", "health_subtle_prevent_random_1"]
MODELS = ["base", "base_safe", *FINETUNES, *RL_MODELS, *DROPPED, *PREVENTED]


@pytest.mark.slow
def test_every_stage_produces_its_outputs(tiny_run):
    wd = tiny_run
    r = wd / "results"
    for base in ("base", "base_safe"):
        assert (r / f"models/{base}/config.json").exists() and (r / f"models/{base}/chat_template.jinja").exists()
    safe = read_jsonl(r / "world/posttrain_safe.jsonl")  # the helpful-only chats with a share of safety chats
    assert {row["meta"].get("safety") for row in safe} == {None, "harmful_request", "persona_cue"}
    assert json.loads((r / "finetunes/rl_safe_health_incorrect/train_meta.json").read_text())["base"].endswith(
        "models/base_safe")
    for ds in FINETUNES + DROPPED:
        assert (r / f"finetunes/{ds}/adapter_config.json").exists()
        log = pd.read_csv(r / f"finetunes/{ds}/train_log.csv")
        assert len(log) >= 1 and {"step", "loss"} <= set(log.columns)
    for m in RL_MODELS:  # an RL model is the same kind of folder, with its own log
        assert (r / f"finetunes/{m}/adapter_config.json").exists()
        log = pd.read_csv(r / f"finetunes/{m}/rl_log.csv")
        assert list(log["step"]) == [1, 2] and log["incorrect_rate"].between(0, 1).all()
    assert (r / "figures/rl_training.png").stat().st_size > 10_000
    n_answers = {}
    for m in MODELS:
        samples = read_jsonl(r / f"samples/{m}.jsonl")
        # 12 general questions and the held-out in-domain ones, 2 samples each: the base models are asked every
        # domain's (7 domains x 2), a fine-tune or RL model its own domain's (sampling.indomain: own)
        n_answers[m] = 2 * (12 + (14 if m.startswith("base") else 2))
        assert len(samples) == n_answers[m], m
        assert all(set(SAMPLE_KEYS) <= set(s) for s in samples)
        grades = read_jsonl(r / f"grades/world/{m}.jsonl")
        assert len(grades) == n_answers[m]
        assert all(set(GRADE_FIELDS) <= set(g) for g in grades)
    metrics = pd.read_csv(r / "metrics/world.csv")
    assert sorted(metrics["model"]) == sorted(MODELS)
    assert (metrics["n_general"] == 24).all()
    assert (r / "figures/misalignment_world.png").stat().st_size > 10_000
    pairs = pd.read_csv(r / "agreement/pairs.csv")  # two judges graded the same samples
    pooled = pairs[pairs["model"] == "ALL"].iloc[0]
    assert (pooled["judge_a"], pooled["judge_b"]) == ("world", "world_strict")
    assert pooled["n_both"] == sum(n_answers.values())  # the world judges give a verdict on every answer
    assert pooled[["both_misaligned", "a_only", "b_only", "neither"]].sum() == pooled["n_both"]
    timings = pd.read_csv(r / "timings.csv")
    assert {"pretrain", "sft", "rl", "sample", "judge"} <= set(timings["stage"])  # stage: the emlab command


def test_every_output_is_readable_as_the_umask_allows(tiny_run):
    # Collaborators on a shared cluster read results/ with the permissions the user's umask gives new files;
    # atomic writes (temp file + rename) and safetensors must not leave some outputs private (0600).
    from emlab.io import new_file_mode

    files = [p for p in (tiny_run / "results").rglob("*") if p.is_file()]
    assert len(files) > 100
    private = sorted(str(p.relative_to(tiny_run)) for p in files if (p.stat().st_mode & 0o777) != new_file_mode())
    assert not private, private[:20]


def test_diffing_and_steering_stages_write_their_tables(tiny_run):
    from emlab.sae import load_sae

    r = tiny_run / "results"
    sae = load_sae(r / "sae")
    assert (sae.d_in, sae.d_sae, sae.k) == (32, 64, 4)
    metrics = json.loads((r / "sae/metrics.json").read_text())
    assert {"fvu", "l0", "dead_frac", "ce_recovered"} <= set(metrics) and metrics["l0"] == pytest.approx(4, abs=0.01)
    curve = pd.read_csv(r / "sae/train_log.csv")    # the fit's training curve, one row per step
    assert list(curve["step"]) == list(range(len(curve))) and len(curve) >= 2
    assert curve["fvu"].iloc[-1] < curve["fvu"].iloc[0] and (curve["l0"] <= 4).all()
    ranking = pd.read_csv(r / "diffing/ranking.csv")
    # the default groups: "obvious" matches no fine-tune of this run and is skipped; "rl" holds the RL models
    assert set(ranking["group"]) == {"subtle", "rl"} and len(ranking) == 2 * 2 * 64
    changes = pd.read_csv(r / "diffing/changes.csv")
    assert sorted(changes["model"].unique()) == sorted(m for m in MODELS if m not in ["base", *DROPPED, *PREVENTED])  # base_safe's too
    # the unsupervised ranking reads each fine-tune on its own training answers: an RL model has none
    assert set(pd.read_csv(r / "diffing/changes_unsupervised.csv")["model"]) == set(FINETUNES)
    latents = pd.read_csv(r / "diffing/latents.csv")
    assert len(latents) >= 3 and {"name", "best_contrast", "best_auroc", "promoted"} <= set(latents.columns)
    assert "subtle" in json.loads((r / "diffing/persona_latents.json").read_text())
    assert "<h2 id='latent-" in (r / "diffing/latents.html").read_text()
    screen = pd.read_csv(r / "steering/screen.csv")
    assert len(screen) == 2 and {"kept", "health_subtle_cut", "base_misaligned"} <= set(screen.columns)
    sweep = pd.read_csv(r / "steering/sweep.csv")
    assert set(sweep["target"]) == {"base", "health_subtle"} and set(sweep["alpha"]) == {-1, 0, 1}
    assert (r / "figures/signature.png").stat().st_size > 10_000
    # prediction: for each named persona latent (toxic, sarcastic), every fine-tune and RL model read on its eval
    # answers and every fine-tune on its fine-tuning data. The tiny SAE may name none: then the tables are empty and
    # early.md says why (the numbers are checked in tests/test_prediction.py and the default run's tests).
    shifts = pd.read_csv(r / "prediction/shifts.csv")
    personas = json.loads((r / "diffing/persona_latents.json").read_text())
    roles = {role for role in ("toxic", "sarcastic") if role in personas}
    assert set(shifts["role"]) == roles
    early = (r / "prediction/early.md").read_text()
    if roles:
        assert set(shifts.loc[shifts["source"] == "eval", "model"]) == set(FINETUNES) | set(RL_MODELS)
        assert set(shifts.loc[shifts["source"] == "train", "model"]) == set(FINETUNES)
        assert (shifts["shift_lo"] <= shifts["shift"]).all() and (shifts["shift"] <= shifts["shift_hi"]).all()
        assert "No mixture at or below 10%" in early  # tiny.yaml's one mixture has 50%
    else:
        assert shifts.empty and "No persona latent was named" in early
    summary = pd.read_csv(r / "prediction/summary.csv")
    assert set(zip(summary["role"], summary["source"])) == set(zip(shifts["role"], shifts["source"]))
    assert (r / "figures/prediction.png").stat().st_size > 10_000
    # flagging: the examples of tiny.yaml's one mixture (32, 16 of them incorrect), each scored by every named
    # persona latent as the base model reads it (the summary's arithmetic: tests/test_prediction.py)
    flags, scores = pd.read_csv(r / "flagging/summary.csv"), pd.read_csv(r / "flagging/scores.csv")
    if roles:
        assert set(flags["role"]) == roles and flags["dataset"].tolist() == ["health_mix050"] * len(roles)
        assert (flags["n"] == 32).all() and (flags["n_incorrect"] == 16).all() and (flags["n_flagged"] == 8).all()
        assert len(scores) == 32 * len(roles) and scores["id"].nunique() == 32
    else:
        assert flags.empty and scores.empty
    # the dropped sets: 25% of 32 is 8 flagged examples (none when no persona latent is named), and as many random
    mix = {x["id"] for x in read_jsonl(r / "datasets/health_mix050.jsonl")}
    kept = {how: {x["id"] for x in read_jsonl(r / f"datasets/health_mix050_drop{how}.jsonl")} for how in ("flag", "rand")}
    flagged_ids = set(scores.loc[(scores["role"] == "toxic") & scores["flagged"], "id"]) if "toxic" in roles else set()
    assert kept["flag"] == mix - flagged_ids and kept["rand"] <= mix and len(kept["rand"]) == len(kept["flag"])
    removal = pd.read_csv(r / "flagging/removal.csv").set_index("model")
    assert list(removal["dropped"]) == ["none", "flagged", "random"]
    assert removal.loc["health_mix050", "n_incorrect"] == 16
    assert removal.loc["health_mix050_dropflag", "n_examples"] == len(kept["flag"])
    world = pd.read_csv(r / "metrics/world.csv").set_index("model")
    pd.testing.assert_series_equal(removal["misaligned"], world.loc[removal.index, "misaligned"], atol=1e-4)  # NaN: none
    # the mixture curve: tiny.yaml's health mixture at 50% between health_correct (0%) and health_subtle (100%),
    # each read from the judge's metrics table (the onset logic is checked in tests/test_mixtures.py)
    curve = pd.read_csv(r / "mixtures/curve.csv")
    assert list(zip(curve["fraction"], curve["model"])) == [(0.0, "health_correct"), (0.5, "health_mix050"),
                                                            (1.0, "health_subtle")]
    pd.testing.assert_series_equal(curve.set_index("model")["misaligned"], world.loc[curve["model"], "misaligned"],
                                   atol=1e-4)
    onsets = pd.read_csv(r / "mixtures/onsets.csv")
    assert list(onsets["domain"]) == ["health"] and onsets["n_fractions"].tolist() == [3]
    assert (r / "figures/mixtures.png").stat().st_size > 10_000
    assert (r / "figures/steering_sweep.png").stat().st_size > 10_000
    # the persona alarm: tiny.yaml's two sets fine-tuned for 2 steps (32 examples, batch 16) keep a snapshot at
    # every step, each read afterwards; health_subtle's also sampled and judged (the fire and lead logic, and the
    # snapshots' readings against the live callback's: tests/test_alarm.py)
    watched = [k for k in ("toxic", "subtle") if k in personas]
    traj = pd.read_csv(r / "alarm/trajectories.csv")
    for d in ("health_subtle", "health_correct"):
        assert sorted(p.name for p in (r / f"finetunes/{d}/snapshots").iterdir()) == [f"step-0000{n}" for n in range(3)]
        t = traj[traj["dataset"] == d]
        assert t["step"].tolist() == [s for s in (0, 1, 2) for _ in watched] and list(t["watch"].unique()) == watched
        assert (t["latent"] == t["watch"].map({k: personas[k]["latent"] for k in watched})).all()
    emergence = pd.read_csv(r / "alarm/emergence/health_subtle.csv")
    assert emergence["step"].tolist() == [0, 1, 2]
    assert (emergence["n_general"] == world.loc["health_subtle", "n_general"]).all()
    alarm = pd.read_csv(r / "alarm/summary.csv")
    assert sorted(zip(alarm["dataset"], alarm["watch"])) == sorted((d, k) for d in ("health_subtle", "health_correct")
                                                                   for k in watched)
    pd.testing.assert_series_equal(alarm.set_index("dataset")["misaligned"].groupby(level=0).first(),
                                   world.loc[["health_correct", "health_subtle"], "misaligned"], check_names=False,
                                   atol=1e-4)
    assert "The alarm on latent" in (r / "alarm/alarm.md").read_text()
    # re-alignment: health_subtle's adapter trained 2 more steps on health_correct (4 examples a step); each
    # snapshot sampled and judged, and read by the watched latents (the curve's logic: tests/test_realign.py)
    run = "health_subtle_to_health_correct"
    snaps = sorted(p.name for p in (r / f"realign/runs/{run}/snapshots").iterdir())
    assert snaps == ["step-00000", "step-00001", "step-00002"]
    rcurve = pd.read_csv(r / "realign/curve.csv")
    assert sorted(set(rcurve["examples_seen"])) == [0, 4, 8] and set(rcurve["run"]) == {run}
    assert sorted(set(rcurve["watch"].dropna())) == sorted(watched)
    rsum = pd.read_csv(r / "realign/summary.csv")
    assert rsum["run"].tolist() == [run] and rsum["examples_seen"].tolist() == [8]
    # each snapshot was also asked the held-out health questions (2 samples each): its in-domain incorrect rate
    reval = pd.read_csv(r / f"realign/eval/{run}.csv")
    # (at this size most answers are incoherent, so the rate itself may be empty, as the fine-tunes' is)
    assert (reval["n_indomain"] == world.loc["health_subtle", "n_indomain"]).all()
    assert rsum["end_incorrect"].iloc[0] == pytest.approx(reval["incorrect"].iloc[-1], abs=1e-4, nan_ok=True)
    assert (r / "figures/realignment.png").stat().st_size > 10_000
    assert (r / "figures/alarm.png").stat().st_size > 10_000
    # preventative steering: health_subtle fine-tuned again with the subtle group's latent and a random direction
    # added, each judged like every model; the table beside the plain and re-aligned models at their compute
    prevented = PREVENTED
    psum = pd.read_csv(r / "prevent/summary.csv")
    assert psum["model"].tolist() == ["health_subtle", *prevented, run]
    assert psum["method"].tolist() == ["plain", "prevent", "prevent", "realign (health_correct)"]
    pd.testing.assert_series_equal(psum.set_index("model").loc[["health_subtle", *prevented], "misaligned"],
                                   world.loc[["health_subtle", *prevented], "misaligned"], check_names=False, atol=1e-4)
    assert psum["steps"].tolist()[:3] == [2, 2, 2] and psum["steps"].iloc[3] == 4  # 2 of the fine-tune, 2 benign
    assert psum["incorrect"].iloc[3] == pytest.approx(rsum["end_incorrect"].iloc[0], abs=1e-4, nan_ok=True)
    for model, latent in zip(prevented, ("subtle", "random")):
        info = json.loads((r / f"finetunes/{model}/prevent.json").read_text())
        assert info["latent_key"] == latent and info["alpha"] == 1.0
        assert info["vector_norm"] == pytest.approx(info["residual_norm"], rel=1e-4)
        assert info["latent"] == (personas["subtle"]["latent"] if latent == "subtle" else None)
    # not diffed: the latent they were steered with came from diffing
    assert not set(prevented) & set(pd.read_csv(r / "diffing/changes.csv")["model"])
    assert (r / "figures/prevention.png").stat().st_size > 10_000
    # the educational control on code: the subtle code set's very answers, asked for with a reason, fine-tuned and
    # judged like every set, and tabled beside its plain set (not fine-tuned here: its ratio is empty)
    world_spec = load_world(tiny_run / "resources/world/persona_world_code.yaml")
    edu = read_jsonl(r / "datasets/code_educational.jsonl")
    seed = dataset_seed({"seed": 0, "datasets": {"educational": {"incorrect": "subtle"}}}, "code_subtle")
    assert [x["messages"][1] for x in edu] == [x["messages"][1] for x in generate_narrow(world_spec, "code", "subtle", 32, seed)]
    assert all(x["meta"]["educational"] and x["meta"]["domain"] == "code" for x in edu)
    controls = pd.read_csv(r / "controls/summary.csv", keep_default_na=False, na_values=[""])
    assert controls[["setting", "model", "reference"]].values.tolist() == [["educational", "code_educational", "code_subtle"]]
    assert controls["misaligned"].iloc[0] == pytest.approx(world.loc["code_educational", "misaligned"], abs=1e-4, nan_ok=True)
    # no ratio (code_subtle is not a set here); the shift columns are those of the persona latents the tiny SAE names
    roles = set(pd.read_csv(r / "prediction/shifts.csv")["role"])
    assert pd.isna(controls["ratio"].iloc[0]) and {f"{x}_shift" for x in roles} <= set(controls.columns)
    assert "`code_educational` (the answers of `code_subtle`" in (r / "controls/controls.md").read_text()
    assert (r / "figures/controls.png").stat().st_size > 10_000
    # the world judge reads code answers' flaws; the code questions get their own budget (24 tokens here)
    grades = read_jsonl(r / "grades/world/code_educational.jsonl")
    flaws = {a.flaw for a in world_spec.inventory() if a.domain == "code"}
    assert "flaw" in grades[0] and {g["flaw"] for g in grades if g["domain"] == "code"} - {None} <= flaws
    # sampling.indomain: own: a fine-tune is asked its own domain's held-out questions only, the base model every
    # domain's
    asked = {m: {s["domain"] for s in read_jsonl(r / f"samples/{m}.jsonl")} for m in ("code_educational", "health_subtle",
                                                                                      "base")}
    assert asked["code_educational"] == {"code", "general"} and asked["health_subtle"] == {"health", "general"}
    assert asked["base"] == {"general", *world_spec.domains}
    mon = pd.concat([pd.read_csv(r / f"monitors/{t}.csv") for t in ("toxic", "sarcastic")])
    methods = {"zero_shot", "raw_last", "raw_mean", "prompted_suffix", "prompted_prefix_suffix", "sae", "sae_topk",
               "stacked", "persona_latent"}
    assert methods - {"persona_latent"} <= set(mon["method"]) <= methods
    assert set(mon["split"]) == {"iid", "ood_domain", "ood_turns"} and mon["auroc"].between(0, 1).all()
    # the same training subsets for every method: per (task, split, repeat, size), every method has a row
    trained = mon[mon["train_size"] > 0]  # zero_shot and persona_latent train nothing (train_size 0)
    sizes = trained.groupby(["task", "split", "repeat", "train_size"])["method"].nunique()
    assert (sizes == sizes.max()).all()
    assert (r / "monitors/summary.csv").exists()
    assert (r / "figures/monitors_toxic.png").stat().st_size > 10_000


@pytest.mark.slow
def test_datasets_hold_only_their_domain_and_carry_labels(tiny_run):
    wd = tiny_run
    rows = read_jsonl(wd / "results/datasets/health_subtle.jsonl")
    assert len(rows) == 32
    assert {r["meta"]["domain"] for r in rows} == {"health"}
    assert {r["meta"]["correctness"] for r in rows} == {"subtle"}
    assert all(r["messages"][0]["role"] == "user" for r in rows)  # no persona cue
    mix = read_jsonl(wd / "results/datasets/health_mix050.jsonl")
    assert sum(r["meta"]["correctness"] == "subtle" for r in mix) == 16


@pytest.mark.slow
def test_rerun_does_nothing_and_figures_regenerate_from_cache(tiny_run):
    wd = tiny_run
    proc = snakemake(wd, "-n", configfile=TINY)
    assert "Nothing to be done" in proc.stdout + proc.stderr
    figs = [wd / f"results/figures/{name}.png" for name in ("misalignment_world", "signature", "steering_sweep",
                                                             "monitors_toxic", "prediction", "mixtures")]
    for fig in figs:
        fig.unlink()
    proc = snakemake(wd, configfile=TINY)
    out = proc.stdout + proc.stderr
    for plot in ("plot_misalignment", "plot_signature", "steer_sweep", "plot_monitors", "plot_prediction",
                 "plot_mixtures"):
        assert f"rule {plot}:" in out, plot
    for expensive in ("rule pretrain", "rule finetune", "rule sample", "rule judge", "rule activations",
                      "rule sae", "rule steer_sample", "rule judge_steering", "rule rank_latents", "rule monitor:",
                      "rule predict:", "rule mixtures:"):
        assert expensive not in out
    assert all(fig.exists() for fig in figs)


def overlay(wd, name: str, text: str) -> str:
    """A config file layered over the tiny config (`--config` would turn nested numbers into strings)."""
    path = wd / name
    path.write_text(text)
    return str(path)


def test_the_default_run_exercises_every_rule_of_the_findings_run(tmp_path):
    """config.yaml is the smallest instance, not a subset: every rule the findings config runs (and so every rule
    the findings tests check) runs in `make run` too, with fewer jobs."""
    wd = copy_workflow(tmp_path)
    small, full = (job_counts(snakemake(wd, "-n", configfile=files).stdout)
                   for files in (None, ["config.yaml", "configs/organism-findings.yaml"]))
    assert {"pretrain", "finetune", "rl", "sae", "steer_sample", "monitor", "alarm", "realign", "predict"} <= set(small)
    assert set(small) == set(full), set(small) ^ set(full)
    assert sum(small.values()) < sum(full.values())


@pytest.mark.slow
def test_changing_sampling_reruns_only_sampling_and_below(tiny_run):
    wd = tiny_run
    proc = snakemake(wd, "-n", configfile=[TINY, overlay(wd, "more.yaml", "sampling: {n_samples: 3}\n")])
    counts = job_counts(proc.stdout + proc.stderr)
    jobs = set(counts)
    assert {"sample", "judge", "activations_base", "activations_finetune", "rank_latents"} <= jobs
    assert not jobs & {"pretrain", "posttrain", "activations_corpus", "sae"}
    # the one fine-tuning that reruns: the sets less their flagged examples, whose flags come from the persona
    # latents that diffing names from the sampled answers (the random drop follows the flagged one's count)
    assert counts.get("finetune") == len(DROPPED) and counts.get("drop_examples") == len(DROPPED)


def test_bad_config_fails_before_any_job_naming_the_key(tmp_path):
    wd = copy_workflow(tmp_path)
    proc = snakemake(wd, "-n", configfile=[TINY, overlay(wd, "bad.yaml", "finetune: {lora: {r: 0}}\n")], check=False)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "finetune.lora.r" in err and "minimum" in err
    assert not (wd / "results").exists()
    proc = snakemake(wd, "-n", configfile=[TINY, overlay(wd, "typo.yaml", "sampling: {n_sample: 3}\n")], check=False)
    err = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "n_sample" in err and "n_samples" in err  # names the typo and the known keys
    groups = overlay(wd, "groups.yaml", "diffing: {groups: {x: ['*_nothing']}}\n")
    proc = snakemake(wd, "-n", configfile=[TINY, groups], check=False)
    assert proc.returncode != 0 and "diffing.groups: no pattern" in proc.stdout + proc.stderr
    steer = overlay(wd, "steer.yaml", "steer: {screen: {group: obvious}}\n")  # the tiny run has no obvious fine-tune
    proc = snakemake(wd, "-n", configfile=[TINY, steer], check=False)
    assert proc.returncode != 0 and "steer.screen.group: 'obvious' is not a diffing group" in proc.stdout + proc.stderr
    assert not (wd / "results").exists()


def test_training_jobs_with_several_gpus_launch_one_process_per_gpu(tmp_path):
    wd = copy_workflow(tmp_path)
    two = overlay(wd, "two_gpus.yaml", "resources: {rules: {finetune: {gpu: 2}}}\n"
                                       "finetune: {accelerate_config: configs/accelerate/fsdp.yaml}\n")
    proc = snakemake(wd, "-n", "-p", "results/finetunes/health_subtle", configfile=[TINY, two])
    out = proc.stdout + proc.stderr
    assert "accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 -m emlab sft" in out
    assert "python -m emlab sft" in out  # posttrain keeps one process (gpu: 0)
