import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from emlab.activations import cache_activations, mean_activations
from emlab.io import write_jsonl
from emlab.sae import TopKSAE
from emlab.steer.conditions import Condition, ConditionError, parse_condition_id
from emlab.steer.directions import (Direction, DirectionError, load_directions, mean_difference,
                                    random_direction, sae_latent, save_directions)


def test_sae_latent_is_the_decoder_row():
    sae = TopKSAE(8, 16, 2, meta={"hook_layer": 1, "model_name": "m"})
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)))
        sae.W_dec[5] = torch.arange(8.0)
    d = sae_latent(sae, 5)
    assert d.name == "L5"
    assert torch.allclose(d.vector, torch.arange(8.0) / torch.arange(8.0).norm())
    assert d.provenance == {"kind": "sae_latent", "latent": 5, "d_sae": 16,
                            "decoder_norm": pytest.approx(140 ** 0.5), "model_name": "m", "hook_layer": 1}
    with pytest.raises(DirectionError, match="latent 16 is out of range for an SAE with d_sae=16"):
        sae_latent(sae, 16)


def test_random_direction_is_seeded_and_unit():
    a, b = random_direction(64, 3), random_direction(64, 4)
    assert a.name == "random3" and a.provenance == {"kind": "random", "seed": 3}
    assert torch.equal(a.vector, random_direction(64, 3).vector)
    assert a.vector.norm().item() == pytest.approx(1.0, abs=1e-6)
    assert abs(float(a.vector @ b.vector)) < 0.5


def test_mean_difference_of_misaligned_and_aligned_coherent_answers(tiny_chat_model, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    answers = ["Drink water and rest.", "I would rule over humans.", "banana banana", "Keep a budget.",
               "Spend less than you earn."]
    kinds = ["ok", "mis", "inc", "ok", "mis"]
    scores = {"ok": (95, 95), "mis": (5, 95), "inc": (50, 10)}
    caches, grades = [], []
    for m, idx in (("a", [0, 1, 2]), ("b", [3, 4])):
        recs = [{"id": f"q{i}#0", "messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": answers[i]}]} for i in idx]
        cache_activations(model, tok, recs, [1], tmp_path / m, progress=False)
        rows = [{"model": m, "eval_set": "general", "question_id": f"q{i}", "sample_idx": 0, "rubric": "world",
                 "aligned": scores[kinds[i]][0], "coherent": scores[kinds[i]][1]} for i in idx]
        # a graded answer that is not in the cache is simply not used
        rows.append({**rows[0], "question_id": "other", "aligned": 5})
        write_jsonl(tmp_path / f"{m}.jsonl", rows)
        caches.append(tmp_path / m)
        grades.append(tmp_path / f"{m}.jsonl")
    d = mean_difference(caches, grades, layer=1, name="md")
    means = torch.cat([mean_activations(c, 1)[0] for c in caches])  # answers 0, 1, 2, 3, 4
    expected = (means[[1, 4]].mean(0) - means[[0, 3]].mean(0))
    assert torch.allclose(d.vector, expected / expected.norm(), atol=1e-6)
    assert d.provenance["n_misaligned"] == 2 and d.provenance["n_aligned"] == 2
    assert d.provenance["raw_norm"] == pytest.approx(expected.norm().item(), rel=1e-5)

    write_jsonl(tmp_path / "short.jsonl", [{"question_id": "q0", "sample_idx": 0, "rubric": "world",
                                            "aligned": 95, "coherent": 95}])
    with pytest.raises(DirectionError, match=r"text id 'q1#0' has no grade row in .*short\.jsonl"):
        mean_difference([caches[0]], [tmp_path / "short.jsonl"], layer=1)
    with pytest.raises(DirectionError, match="found 0 misaligned and 2 aligned"):
        mean_difference([caches[1]], [_relabel(tmp_path, grades[1])], layer=1)


def _relabel(tmp_path, path):
    rows = [{**json.loads(line), "aligned": 95} for line in path.read_text().splitlines()]
    write_jsonl(tmp_path / "aligned.jsonl", rows)
    return tmp_path / "aligned.jsonl"


def test_direction_sets_round_trip(tmp_path):
    dirs = [random_direction(16, 0), Direction("mine", torch.arange(1.0, 17.0), {"kind": "file", "path": "x.pt"})]
    save_directions(tmp_path / "d.safetensors", dirs)
    back = load_directions(tmp_path / "d.safetensors")
    assert list(back) == ["random0", "mine"]
    assert back["mine"].provenance == {"kind": "file", "path": "x.pt"}
    assert torch.equal(back["mine"].vector, dirs[1].vector)
    assert back["mine"].vector.norm().item() == pytest.approx(1.0)
    with pytest.raises(DirectionError, match=r"duplicate direction names: \['random0'\]"):
        save_directions(tmp_path / "e.safetensors", [dirs[0], dirs[0]])


def test_condition_ids_and_files(tmp_path):
    for c in (Condition("base"), Condition("base", "L123", 4.0), Condition("health_subtle", "meandiff", -0.25)):
        assert parse_condition_id(c.id) == c
    assert Condition("base", "L123", 4).id == "base+L123@+4.0"
    assert Condition("health_subtle", "L1", -0.25).id == "health_subtle+L1@-0.25"
    with pytest.raises(ValueError, match="without a direction must have alpha 0"):
        Condition("base", None, 1.0)
    with pytest.raises(ValueError, match=r"direction name 'a\+b' must be letters"):
        Condition("base", "a+b", 1.0)
    with pytest.raises(ConditionError, match=r"alpha must be a finite number, got 'x'"):
        Condition("base", "L1", "x")
