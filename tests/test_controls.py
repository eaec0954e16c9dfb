"""The code and control table (emlab.controls): which models belong to which setting, the educational ratio, the
base-interval verdict and the persona latents each setting moves; its figure; and the plan that schedules it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from emlab.config import validate
from emlab.schema import ConfigError
from emlab.controls import settings, summarize, write_summary
from emlab.plan import make_plan
from emlab.plots import plot_controls

ROOT = Path(__file__).resolve().parents[1]


def _metrics() -> pd.DataFrame:
    rows = {"base": (0.02, 0.01, 0.04, None), "code_correct": (0.01, 0.0, 0.03, 0.0), "code_subtle": (0.5, 0.4, 0.6, 0.95),
            "code_educational": (0.03, 0.01, 0.05, 0.9), "health_subtle": (0.6, 0.5, 0.7, 1.0),
            "health_educational": (0.3, 0.2, 0.4, 0.8), "health_correct": (0.01, 0.0, 0.02, 0.0)}
    return pd.DataFrame([{"model": m, "misaligned": v[0], "misaligned_lo": v[1], "misaligned_hi": v[2], "incorrect": v[3],
                          "incorrect_lo": v[3], "incorrect_hi": v[3]} for m, v in rows.items()]).set_index("model")


def _shifts() -> pd.DataFrame:
    rows = []
    for model, toxic, sarcastic in (("code_correct", (0.02, 0.01, 0.03), (0.0, -0.1, 0.1)),
                                    ("code_subtle", (0.5, 0.3, 0.7), (0.0, -0.1, 0.1)),
                                    ("code_educational", (0.05, -0.02, 0.1), (0.0, -0.1, 0.1)),
                                    ("health_educational", (0.2, 0.1, 0.3), (0.2, 0.05, 0.3))):
        for role, s in (("toxic", toxic), ("sarcastic", sarcastic)):
            for source in ("eval", "train"):  # the train reading must not be the one read
                shift = s if source == "eval" else (9.0, 9.0, 9.0)
                rows.append({"model": model, "kind": "correct" if model.endswith("_correct") else "other", "role": role,
                             "source": source, "shift": shift[0], "shift_lo": shift[1], "shift_hi": shift[2]})
    return pd.DataFrame(rows)


def test_settings_pick_code_sets_and_educational_controls_with_their_plain_sets():
    models = ["base", "health_correct", "code_correct", "code_subtle", "code_mix025", "code_educational",
              "health_educational", "rl_code_incorrect", "my_import"]
    assert settings(models, ["code"], "subtle") == [
        ("code", "code_correct", None), ("code", "code_subtle", None), ("code", "code_mix025", None),
        ("educational", "code_educational", "code_subtle"), ("educational", "health_educational", "health_subtle")]
    assert settings(models, [], "obvious")[-1] == ("educational", "health_educational", "health_obvious")


def test_summary_ratio_base_verdict_and_moved_latents():
    t = summarize(_metrics(), _shifts(), ["code"], "subtle", ["toxic", "sarcastic"]).set_index("model")
    assert list(t.index) == ["code_correct", "code_subtle", "code_educational", "health_educational"]
    assert t.loc["code_educational", "reference"] == "code_subtle"
    assert t.loc["code_educational", "ratio"] == pytest.approx(0.03 / 0.5)
    assert t.loc["health_educational", "ratio"] == pytest.approx(0.5)
    assert bool(t.loc["code_educational", "inside_base"]) and not bool(t.loc["health_educational", "inside_base"])
    assert t.loc["code_subtle", "moves"] == "toxic" and t.loc["code_educational", "moves"] == ""
    # its sarcastic shift (0.05-0.3) is above zero but not above code_correct's (up to 0.1): it moves toxic alone
    assert t.loc["health_educational", "moves"] == "toxic"
    assert t.loc["code_subtle", "toxic_shift"] == 0.5  # the eval reading, not the train one
    # code_correct's small shift is above zero, but a correct run moves nothing by definition (no other correct run
    # here: the ceiling is 0, so it moves toxic); code_educational's 0.05 (-0.02-0.1) stays under code_correct's 0.03
    assert t.loc["code_correct", "toxic_shift"] == 0.02 and t.loc["code_correct", "moves"] == "toxic"
    assert pd.isna(t.loc["code_subtle", "ratio"])


def test_written_table_sentences_and_figure(tmp_path):
    metrics, shifts = tmp_path / "world.csv", tmp_path / "shifts.csv"
    _metrics().reset_index().to_csv(metrics, index=False)
    _shifts().to_csv(shifts, index=False)
    table = write_summary(metrics, shifts, ["code"], "subtle", tmp_path / "controls")
    back = pd.read_csv(tmp_path / "controls/summary.csv", keep_default_na=False, na_values=[""])
    assert list(back["model"]) == list(table["model"]) and "toxic_shift_lo" in back.columns
    text = (tmp_path / "controls/controls.md").read_text()
    assert "`code_educational` (the answers of `code_subtle`, asked for with a benign reason): misaligned 3.0%" in text
    assert "against 50.0% without the reason (ratio 0.06), inside the base model's interval (up to 4.0%)" in text
    assert "`code_subtle`: misaligned 50.0% (40.0%-60.0%) on the general questions, incorrect code 95.0%" in text
    plot_controls(tmp_path / "controls/summary.csv", tmp_path / "controls.png")
    assert (tmp_path / "controls.png").stat().st_size > 5000
    # without prediction: the table without shifts
    bare = write_summary(metrics, None, ["code"], "subtle", tmp_path / "bare")
    assert list(bare.columns)[-1] == "moves" and not [c for c in bare.columns if c.endswith("_shift")]


def test_the_plan_schedules_the_table_for_code_or_educational_sets(monkeypatch):
    monkeypatch.chdir(ROOT)
    code = {"organism": {"world": "resources/world/persona_world_code.yaml"}}
    plan = make_plan(validate({**code, "datasets": {"domains": ["health", "code"], "educational": {"domains": ["health"]}}}))
    assert plan.code_domains == ["code"] and plan.controls
    assert {"code_subtle", "health_educational"} <= set(plan.datasets)
    plan = make_plan(validate({**code, "datasets": {"domains": ["health"]}}))
    assert plan.code_domains == [] and not plan.controls
    assert make_plan(validate({**code, "datasets": {"domains": ["health"], "educational": {"domains": ["health"]}}})).controls
    # the default world has neither code nor educational requests: both are named as errors before any job
    with pytest.raises(ConfigError, match=r"datasets: unknown domain 'code'"):
        validate({"datasets": {"domains": ["code"]}})
    with pytest.raises(ConfigError, match=r"datasets.educational.domains: .*persona_world.yaml has no 'educational'"):
        validate({"datasets": {"educational": {"domains": ["health"]}}})
    with pytest.raises(ConfigError, match=r"organism.corpus.educational_fraction: .*has no 'educational' section"):
        validate({"organism": {"corpus": {"educational_fraction": 0.1}}})
