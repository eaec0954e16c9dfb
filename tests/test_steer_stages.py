"""The glue of the steering stages: random controls, pooled controls, sweep strengths."""

import json

import pytest

from emlab.steer.conditions import Condition
from emlab.steer.directions import Direction, DirectionError, orthogonal_to, random_direction
from emlab.steer.stage import POOLED_RANDOM, pooled_random_rows, sweep_alphas, sweep_directions


def test_random_control_is_orthogonal_to_the_directions_it_controls_for():
    a, b = random_direction(16, 1, "a"), random_direction(16, 2, "b")
    r = orthogonal_to(random_direction(16, 0), [a, b])
    assert abs(float(r.vector @ a.vector)) < 1e-6 and abs(float(r.vector @ b.vector)) < 1e-6
    assert float(r.vector.norm()) == pytest.approx(1.0) and r.provenance["orthogonal_to"] == ["a", "b"]
    assert orthogonal_to(a, []) is a
    with pytest.raises(DirectionError, match="span"):
        orthogonal_to(Direction("c", a.vector * 2), [a])


def test_random_controls_are_pooled_per_target_and_strength():
    rows = [{"model": Condition("base", "random0", 1.0).id, "x": 1}, {"model": Condition("base", "random1", 1.0).id, "x": 2},
            {"model": Condition("base", "L3", 1.0).id, "x": 3}, {"model": "base", "x": 4}]
    pooled = pooled_random_rows(rows, ["random0", "random1"])
    assert [r["model"] for r in pooled] == [f"base+{POOLED_RANDOM}@+1.0"] * 2 and [r["x"] for r in pooled] == [1, 2]


def test_sweep_covers_the_screen_strengths_of_the_swept_latents(tmp_path):
    screen = tmp_path / "screen.json"
    screen.write_text(json.dumps({"kept": ["L5", "L9", "L1"], "chosen": {"L5": 2.0, "L9": 3.0, "L1": 1.25}}))
    cfg = {"steer": {"sweep": {"alphas": [-1, 0, 1]}}}
    assert sweep_alphas(cfg, str(screen)) == [-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0]  # L1 is not swept (third)
    info = {"candidates": ["L5", "L9", "L1", "L7"], "meandiff": "meandiff", "random": ["random0"]}
    assert sweep_directions(info, str(screen)) == ["L5", "L9", "meandiff", "random0"]
    # a separate subtracting strength is swept too (both signs), for the swept latents only
    screen.write_text(json.dumps({"kept": ["L5", "L9", "L1"], "chosen": {"L5": 2.0, "L9": 3.0, "L1": 1.25},
                                  "subtract": {"L5": 0.5, "L9": 0.5, "L1": 0.75}}))
    assert sweep_alphas(cfg, str(screen)) == [-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0]
    screen.write_text(json.dumps({"kept": [], "chosen": {}}))
    assert sweep_directions({**info, "meandiff": None}, str(screen)) == ["L5", "L9", "random0"]
