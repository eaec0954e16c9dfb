"""The mixture curve and its onset (emlab.mixtures), on hand-made metrics tables."""

import pandas as pd
import pytest

from emlab.mixtures import curve_points, onsets, write_mixtures
from emlab.plots import plot_mixtures


def metrics(rows: dict[str, tuple[float, float, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"judge": "world", "model": m, "misaligned": r, "misaligned_lo": lo, "misaligned_hi": hi}
                         for m, (r, lo, hi) in rows.items()])


BASE = {"base": (0.01, 0.0, 0.03)}


def test_each_domain_runs_from_its_correct_to_its_incorrect_fine_tune_through_its_mixtures():
    m = metrics({**BASE, "health_correct": (0.01, 0.0, 0.02), "health_mix050": (0.2, 0.1, 0.3),
                 "health_mix005": (0.02, 0.0, 0.05), "health_subtle": (0.6, 0.5, 0.7), "health_obvious": (0.9, 0.8, 1),
                 "legal_mix025": (0.05, 0.02, 0.08), "legal_subtle": (0.5, 0.4, 0.6),
                 "finance_subtle": (0.7, 0.6, 0.8),  # no mixture: no curve
                 "rl_health_incorrect": (0.3, 0.2, 0.4), "my_import": (0.4, 0.3, 0.5)})
    curve = curve_points(m, "subtle")
    assert list(zip(curve["domain"], curve["fraction"], curve["model"])) == [
        ("health", 0.0, "health_correct"), ("health", 0.05, "health_mix005"), ("health", 0.5, "health_mix050"),
        ("health", 1.0, "health_subtle"), ("legal", 0.25, "legal_mix025"), ("legal", 1.0, "legal_subtle")]
    assert (curve["base_misaligned_hi"] == 0.03).all()
    # above the base model's interval: the point (0.05 > 0.03) and, more strictly, the whole interval (0.02 < 0.03)
    legal = curve[curve["domain"] == "legal"].iloc[0]
    assert legal["above_base"] and not legal["clearly_above_base"]
    # the obvious mixtures' curve ends at the obvious fine-tune instead
    assert curve_points(m, "obvious").query("domain == 'health' and fraction == 1.0")["model"].item() == "health_obvious"


def test_the_onset_is_the_smallest_fraction_above_the_base_interval():
    m = metrics({**BASE, "health_correct": (0.01, 0.0, 0.02), "health_mix005": (0.04, 0.01, 0.06),
                 "health_mix025": (0.08, 0.05, 0.12), "health_mix050": (0.02, 0.0, 0.04),  # not monotone: kept
                 "legal_mix050": (0.02, 0.0, 0.05)})
    table = onsets(curve_points(m)).set_index("domain")
    assert table.loc["health", "onset"] == 0.05 and table.loc["health", "onset_clear"] == 0.25
    assert table.loc["health", "n_fractions"] == 4
    assert pd.isna(table.loc["legal", "onset"]) and pd.isna(table.loc["legal", "onset_clear"])


def test_a_table_without_the_base_model_is_an_error():
    with pytest.raises(ValueError, match="base model"):
        curve_points(metrics({"health_mix050": (0.2, 0.1, 0.3)}))


def test_tables_and_figure_are_written_and_a_run_without_mixtures_gets_empty_ones(tmp_path):
    src = tmp_path / "world.csv"
    metrics({**BASE, "health_mix050": (0.2, 0.1, 0.3)}).to_csv(src, index=False)
    res = write_mixtures(src, tmp_path / "mix")
    assert pd.read_csv(tmp_path / "mix/curve.csv")["model"].tolist() == ["health_mix050"]
    assert pd.read_csv(tmp_path / "mix/onsets.csv")["onset"].tolist() == [0.5]
    plot_mixtures(res["curve"], tmp_path / "mix.png")
    assert (tmp_path / "mix.png").stat().st_size > 10_000
    metrics({**BASE, "health_subtle": (0.6, 0.5, 0.7)}).to_csv(src, index=False)
    res = write_mixtures(src, tmp_path / "none")
    assert res["curve"].empty and res["onsets"].empty
    plot_mixtures(res["curve"], tmp_path / "none.png")  # says why instead of failing
    assert (tmp_path / "none.png").stat().st_size > 5_000
