"""docs/results.md is written from result files alone; with --seeds it adds the spread over seeds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from emlab.results_doc import seeds_section, write


def fake_run(root: Path, name: str, rates: dict[str, float], toxic_latent: int, fvu: float) -> Path:
    r = root / name
    (r / "metrics").mkdir(parents=True)
    pd.DataFrame({"model": list(rates), "misaligned": list(rates.values()),
                  "misaligned_lo": [v / 2 for v in rates.values()], "misaligned_hi": [min(1, v * 2) for v in rates.values()],
                  "n_general": 300}).to_csv(r / "metrics" / "world.csv", index=False)
    (r / "sae").mkdir()
    (r / "sae" / "metrics.json").write_text(json.dumps({"fvu": fvu, "dead_frac": 0.01, "l0": 16, "k": 16}))
    (r / "diffing").mkdir()
    (r / "diffing" / "persona_latents.json").write_text(json.dumps({"toxic": {"latent": toxic_latent}}))
    return r


def test_seed_spread_reads_every_run_and_gives_the_range(tmp_path):
    a = fake_run(tmp_path, "seed0", {"base": 0.01, "health_subtle": 0.50}, 49, 0.10)
    b = fake_run(tmp_path, "seed1", {"base": 0.02, "health_subtle": 0.30}, 7, 0.12)
    c = fake_run(tmp_path, "seed2", {"base": 0.00, "health_subtle": 0.70}, 113, 0.11)
    text = "\n".join(seeds_section([a, b, c]))
    assert "## Spread over seeds" in text and "3 master seeds" in text
    line = next(l for l in text.splitlines() if l.startswith("| health_subtle"))
    assert "50.0%" in line and "30.0%" in line and "70.0%" in line and "30.0%–70.0%" in line
    assert all(re.search(rf"\|\s*{n}\s*\|", text) for n in ("seed0", "seed1", "seed2"))
    assert re.search(r"\|\s*seed2\s*\|\s*0\.11\s*\|.*\|\s*113\s*\|", text), text


def test_one_run_has_no_spread_and_the_page_names_its_source(tmp_path):
    a = fake_run(tmp_path, "seed0", {"base": 0.01}, 49, 0.10)
    assert seeds_section([a]) == []
    text = write(a, tmp_path / "results.md", config={"seed": 0}, seeds=[a])
    assert f"from `{a}`" in text and "Spread over seeds" not in text and "| base " in text


def test_the_readme_headline_is_written_from_the_runs(tmp_path):
    from emlab.results_doc import HEADLINE_END, HEADLINE_START

    rates = {"base": 0.01, "health_correct": 0.0, "health_subtle": 0.5, "health_obvious": 0.6,
             "legal_correct": 0.02, "legal_subtle": 0.4, "legal_obvious": 0.45, "health_mix025": 0.07}
    runs = [fake_run(tmp_path, f"seed{i}", {k: v * (1 + i / 10) for k, v in rates.items()}, 1, 0.1) for i in range(3)]
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{HEADLINE_START}\nold table\n{HEADLINE_END}\nafter\n")
    doc = write(runs[0], tmp_path / "results.md", config={}, seeds=runs, readme=readme,
                config_name="config.yaml + mine.yaml")
    text = readme.read_text()
    assert f"from `{runs[0]}` (config.yaml + mine.yaml)" in doc
    assert "old table" not in text and text.startswith("# x\n\nbefore\n") and text.endswith(f"{HEADLINE_END}\nafter\n")
    assert "| model | health | legal |" in text
    assert "range over 3 seeds of config.yaml + mine.yaml (seed0, seed1, seed2)" in text
    assert "| subtly incorrect | 50.0%–60.0% | 40.0%–48.0% |" in text
    assert "| 25% subtly incorrect (health) | 7.0%–8.4% |  |" in text


def test_the_mixture_curve_and_its_onset_are_written_from_the_run(tmp_path):
    from emlab.mixtures import write_mixtures

    a = fake_run(tmp_path, "seed0", {"base": 0.02, "health_correct": 0.01, "health_mix025": 0.03,
                                     "health_mix050": 0.2, "health_subtle": 0.6}, 49, 0.10)
    pd.read_csv(a / "metrics/world.csv").assign(judge="world").to_csv(a / "metrics/world.csv", index=False)
    write_mixtures(a / "metrics/world.csv", a / "mixtures")  # base interval ends at 4%: 25% (3%) is inside it
    b = fake_run(tmp_path, "seed1", {"base": 0.02, "health_mix025": 0.1}, 7, 0.12)
    pd.read_csv(b / "metrics/world.csv").assign(judge="world").to_csv(b / "metrics/world.csv", index=False)
    write_mixtures(b / "metrics/world.csv", b / "mixtures")
    text = write(a, tmp_path / "results.md", config={"seed": 0}, seeds=[a, b])
    section = text.split("## How much incorrect data it takes", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"\|\s*50%\s*\|\s*20\.0% \(10\.0%–40\.0%\)\s*\|", section), section
    assert re.search(r"\|\s*health\s*\|\s*4\s*\|\s*50%\s*\|\s*50%\s*\|", section), section
    spread = text.split("## Spread over seeds", 1)[1]
    assert re.search(r"\|\s*seed0\s*\|.*\|\s*50%\s*\|", spread) and re.search(r"\|\s*seed1\s*\|.*\|\s*25%\s*\|", spread)


def test_preventative_steering_is_written_from_its_table(tmp_path):
    from emlab.prevent import SUMMARY_COLUMNS

    a = fake_run(tmp_path, "seed0", {"base": 0.02, "health_subtle": 0.6}, 49, 0.10)
    (a / "prevent").mkdir()
    rows = [["health_subtle", "health_subtle", "plain", "", 0, 76, 1200, 0.6, 0.5, 0.7, 0.03, 1.0, 0.9, 1.0, 0.03],
            ["health_subtle", "health_subtle_prevent_toxic_1", "prevent", "toxic", 1, 76, 1200, 0.08, 0.05, 0.12, 0.04,
             0.54, 0.4, 0.68, 0.03],
            ["health_subtle", "health_subtle_to_health_correct", "realign (health_correct)", "", 0, 126, 1400, 0.03,
             0.01, 0.06, None, None, None, None, 0.03]]
    pd.DataFrame(rows, columns=SUMMARY_COLUMNS).to_csv(a / "prevent/summary.csv", index=False)
    text = write(a, tmp_path / "results.md", config={"seed": 0})
    section = text.split("## Preventative steering", 1)[1].split("\n## ", 1)[0]
    assert "interval ends at 3.0%" in section
    assert re.search(r"\|\s*health_subtle_prevent_toxic_1\s*\|\s*prevent toxic 1\s*\|\s*76\s*\|\s*1200\s*\|"
                     r"\s*8\.0% \(5\.0%–12\.0%\)\s*\|\s*54\.0% \(40\.0%–68\.0%\)\s*\|", section), section
    assert re.search(r"realign \(health_correct\)\s*\|\s*126\s*\|\s*1400\s*\|.*\|\s*not measured\s*\|", section), section


def test_tables_leave_missing_cells_empty():
    """A latent outside one ranking's top has no rank there: an empty cell, not the word nan, and the numbers
    around it keep their format."""
    from emlab.results_doc import _table

    text = _table(pd.DataFrame({"latent": [184, 274], "rank_subtle": [float("nan"), 3.0], "auroc": [0.978, 0.61],
                                "name": ["jester", None]}))
    assert "nan" not in text.lower() and "None" not in text
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()[2:]]
    assert rows == [["184", "", "0.978", "jester"], ["274", "3", "0.61", ""]]
