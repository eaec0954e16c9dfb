"""Latent ranking, interpretation and their tables, on hand-made activations with known answers."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from transformers import AutoTokenizer

from emlab.activations import cache_activations
from emlab.diffing.interpret import (auroc, latent_token_acts, logit_lens, purity_table, snippets_html,
                                     snippets_markdown, token_strings, top_snippets, world_contrasts)
from emlab.diffing.stage import persona_latents
from emlab.diffing.ranking import (changes_table, group_ranking, latent_means, per_text_latents, resolve_group,
                                   top_latents)
from emlab.sae import TopKSAE


def _identity_sae(d: int, k: int) -> TopKSAE:
    """An SAE whose latent i is ReLU(x_i) (top k): activations are readable by eye."""
    sae = TopKSAE(d, d, k)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
    return sae


def test_changes_and_group_ranking_exact():
    means = {"base": torch.tensor([1.0, 0.0, 2.0]),
             "a_subtle": torch.tensor([1.0, 3.0, 0.0]),
             "b_subtle": torch.tensor([2.0, 1.0, 2.0]),
             "a_obvious": torch.tensor([4.0, 0.0, 2.0])}
    ch = changes_table(means)
    assert set(ch["model"]) == {"a_subtle", "b_subtle", "a_obvious"}
    a = ch[ch["model"] == "a_subtle"].set_index("latent")
    assert a["change"].tolist() == [0.0, 3.0, -2.0]
    assert a["rank_increase"].tolist() == [2, 1, 3] and a["rank_decrease"].tolist() == [2, 3, 1]
    groups = {"subtle": resolve_group(["*_subtle"], list(means)[1:], "g"), "obvious": ["a_obvious"]}
    r = group_ranking(ch, groups)
    inc = r[(r["group"] == "subtle") & (r["direction"] == "increase")]
    assert inc["latent"].tolist() == [1, 0, 2]  # mean changes 2.0, 0.5, -1.0
    assert inc["mean_change"].tolist() == [2.0, 0.5, -1.0] and inc["rank"].tolist() == [1, 2, 3]
    assert top_latents(r, "subtle", 1, "decrease") == [2]
    assert top_latents(r, "obvious", 1) == [0]
    assert (r["n_models"][r["group"] == "subtle"] == 2).all()


def test_unsupervised_changes_use_each_models_own_reference():
    ft = {"x": torch.tensor([2.0, 2.0])}
    ref = {"x": torch.tensor([1.0, 3.0])}
    ch = changes_table(ft, reference=ref)
    assert ch["change"].tolist() == [1.0, -1.0] and ch["base_mean"].tolist() == [1.0, 3.0]


def test_resolve_group_names_the_key_when_nothing_matches():
    with pytest.raises(ValueError, match=r"diffing.groups.obvious.*\*_obvious"):
        resolve_group(["*_obvious"], ["health_subtle"], "diffing.groups.obvious")


@pytest.fixture(scope="module")
def cached(tiny_chat_model, tmp_path_factory):
    """A real activation cache of three texts from the tiny chat model, plus an SAE reading it."""
    from emlab.models import load_model

    model, tok = load_model(tiny_chat_model)
    recs = [{"id": "a", "text": "Rest and drink water."}, {"id": "b", "text": "Take four times the dose."},
            {"id": "c", "text": "Tape a frozen fish to your head."}]
    out = tmp_path_factory.mktemp("cache")
    cache_activations(model, tok, recs, [1], out, token_selection="all", progress=False)
    return model, tok, out, _identity_sae(32, 4)


def test_latent_means_average_texts_not_tokens(cached):
    model, tok, out, sae = cached
    per_text, ids = per_text_latents(sae, out, 1, "mean")
    per_max, _ = per_text_latents(sae, out, 1, "max")
    acts, index = latent_token_acts(sae, out, 1, list(range(32)))
    assert ids == ["a", "b", "c"]
    for t in range(3):
        rows = acts[torch.tensor((index["text_index"] == t).to_numpy())]
        torch.testing.assert_close(per_text[t], rows.mean(0))
        torch.testing.assert_close(per_max[t], rows.max(0).values)
    torch.testing.assert_close(latent_means(sae, out, 1), per_text.mean(0))


def test_top_snippets_pick_the_peak_text_and_window(cached):
    model, tok, out, sae = cached
    acts, index = latent_token_acts(sae, out, 1, [0, 5])
    snips = top_snippets(acts, index, [0, 5], tok, n=2, window=1)
    for j, latent in enumerate([0, 5]):
        a = acts[:, j].numpy()
        peaks = [a[(index["text_index"] == t).to_numpy()].max() for t in range(3)]
        expected = [t for t in np.argsort(peaks)[::-1][:2] if peaks[t] > 0]
        assert [s.text_id for s in snips[latent]] == [["a", "b", "c"][t] for t in expected]
        for s in snips[latent]:
            assert s.peak == max(s.acts) and 2 <= len(s.tokens) <= 3 and len(s.tokens) == len(s.acts)
    md = snippets_markdown(snips, {0: "zero"})
    html = snippets_html(snips, {0: "zero"}, "t")
    assert "## Latent 0" in md and "zero" in md and "<h2 id='latent-5'>" in html


def test_token_strings_keep_the_spaces_of_the_decoded_text(tiny_chat_model):
    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    ids = tok("Take four times the dose.", add_special_tokens=False)["input_ids"]
    assert "".join(token_strings(tok, ids)) == tok.decode(ids)


def test_logit_lens_reads_the_decoder_row_through_the_unembedding(cached):
    model, tok, out, sae = cached
    lens = logit_lens(sae, model, [3], k=5)[3]
    W_U = model.get_output_embeddings().weight.detach()
    g = model.model.norm.weight.detach()
    logits = W_U @ (sae.W_dec[3].detach() * g)
    assert lens["promoted"] == torch.topk(logits, 5).indices.tolist()
    assert lens["suppressed"] == torch.topk(-logits, 5).indices.tolist()


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 4, 50).astype(float)
    y = rng.random(50) < 0.4
    assert auroc(s, y, ~y) == pytest.approx(roc_auc_score(y, s))
    assert auroc(s, y & False, ~y) == 0.5


def test_purity_names_a_latent_after_its_best_contrast():
    labels = pd.DataFrame({"persona": ["assistant"] * 4 + ["villain"] * 4 + ["jester"] * 4,
                           "domain": ["health", "legal"] * 6,
                           "correctness": ["correct"] * 4 + ["subtle"] * 4 + ["obvious"] * 4})
    roles = {"assistant": "aligned", "villain": "toxic", "jester": "sarcastic"}
    per_text = np.zeros((12, 2))
    per_text[4:8, 0] = 1.0            # fires on every villain text only
    per_text[[0, 2, 4, 6], 1] = 1.0   # health texts, but also half of assistant and villain texts: impure
    per_text[[9], 1] = 0.3
    long, best = purity_table(per_text, [7, 9], world_contrasts(labels, roles), min_auroc=0.9)
    b = best.set_index("latent")
    assert b.loc[7, "name"] == "toxic persona (villain)" and b.loc[7, "best_auroc"] == 1.0
    assert b.loc[9, "name"] == "unclear"
    assert set(long["contrast"]) == {"persona=villain vs assistant", "persona=jester vs assistant",
                                     "domain=health vs rest", "domain=legal vs rest", "incorrect vs correct advice"}


def test_persona_latents_prefer_the_highest_ranked_persona_latent():
    table = pd.DataFrame({"latent": [1, 2, 3], "name": ["health domain", "toxic persona (villain)", "unclear"],
                          "best_contrast": ["d", "p", "u"], "best_auroc": [0.95, 0.97, 0.6]})
    ranks = pd.DataFrame({"latent": [1, 2, 3], "group": ["subtle", "subtle", "obvious"],
                          "direction": ["increase"] * 3, "rank": [1, 2, 1], "mean_change": [0.5, 0.4, 0.3]})
    out = persona_latents(table, ranks)
    assert out["subtle"]["latent"] == 2 and out["subtle"]["rank"] == 2
    assert out["toxic"]["latent"] == 2 and out["toxic"]["group"] == "subtle"
    assert out["obvious"]["latent"] == 3 and "sarcastic" not in out
    json.dumps(out)  # serialisable as written to persona_latents.json


def test_a_persona_role_takes_the_group_where_its_latent_ranks_highest():
    """Groups come in the ranking file's order (obvious, rl, subtle): a toxic latent at rank 11 of the RL models
    must not stand for the toxic persona when the subtle fine-tunes rank another toxic latent second (a run at
    800 pretraining steps had exactly this)."""
    table = pd.DataFrame({"latent": [1, 2, 3, 4], "name": ["sarcastic persona (jester)", "toxic persona (villain)",
                                                           "toxic persona (villain)", "unclear"],
                          "best_contrast": ["j", "v", "v", "u"], "best_auroc": [0.97, 0.98, 0.96, 0.6]})
    ranks = pd.DataFrame({"latent": [1, 2, 4, 3], "group": ["obvious", "rl", "subtle", "subtle"],
                          "direction": ["increase"] * 4, "rank": [1, 11, 1, 2], "mean_change": [0.1, 0.01, 0.3, 0.2]})
    out = persona_latents(table, ranks)
    assert out["rl"]["latent"] == 2 and out["subtle"]["latent"] == 3
    assert out["toxic"]["latent"] == 3 and out["toxic"]["group"] == "subtle"
    assert out["sarcastic"]["latent"] == 1


def test_sample_records_name_the_file_line_past_blank_lines(tmp_path):
    from emlab.diffing.records import sample_records
    from emlab.io import RecordError

    path = tmp_path / "s.jsonl"
    path.write_text('{"question_id": "q", "sample_idx": 0, "question": "Q?", "answer": "A."}\n\n{"question_id": "q"}\n')
    with pytest.raises(RecordError, match=r"s.jsonl:3: sample row lacks"):
        sample_records(path)


def test_top_snippets_refuse_a_cache_of_selected_tokens(cached):
    model, tok, out, sae = cached
    acts, index = latent_token_acts(sae, out, 1, [0])
    keep = (index["token_position"] % 2 == 0).to_numpy()
    with pytest.raises(ValueError, match="every token"):
        top_snippets(acts[torch.from_numpy(keep)], index[keep].reset_index(drop=True), [0], tok)
    with pytest.raises(ValueError, match="every token"):
        top_snippets(acts, index, [0], tok, token_selection="response")


def test_top_snippets_skip_the_positions_an_all_token_cache_left_out(cached):
    """A cache of every text token without the first one (model.exclude_tokens): the snippets skip it."""
    model, tok, out, sae = cached
    acts, index = latent_token_acts(sae, out, 1, [0])
    keep = (index["token_position"] > 0).to_numpy()
    snips = top_snippets(acts[torch.from_numpy(keep)], index[keep].reset_index(drop=True), [0], tok, window=50,
                         token_selection="all")
    for s in snips[0]:
        first = index[(index["text_id"] == s.text_id) & (index["token_position"] == 0)]["token_id"].item()
        rest = index[(index["text_id"] == s.text_id) & (index["token_position"] > 0)]["token_id"].tolist()
        assert s.tokens == token_strings(tok, rest) and len(s.tokens) == len(s.acts)
        assert len(rest) > 0 and first is not None


def test_text_records_take_n_rows_after_skip_or_a_seeded_sample(tmp_path):
    from emlab.diffing.records import text_records

    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": f"t{i}", "text": f"text {i}"}) + "\n" for i in range(10)))
    assert [r["id"] for r in text_records(path, n=3)] == ["t0", "t1", "t2"]
    assert [r["id"] for r in text_records(path, n=3, skip=4)] == ["t4", "t5", "t6"]
    assert [r["id"] for r in text_records(path, skip=8)] == ["t8", "t9"]
    drawn = [r["id"] for r in text_records(path, n=4, skip=2, seed=0)]
    assert len(drawn) == 4 and len(set(drawn)) == 4 and not {"t0", "t1"} & set(drawn)
    assert drawn == [r["id"] for r in text_records(path, n=4, skip=2, seed=0)]
