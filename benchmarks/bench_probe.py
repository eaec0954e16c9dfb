"""Likelihood-probe steering sweep: V steering vectors at one middle layer read in one call of
steered_answer_logprobs, which runs the layers below the steered one once per batch
(emlab.arch.reusing_prefix), against V one-vector calls, each a full forward, in the same run.
A second row times the read-out: the unembedding of the answer-predicting positions only (logits_to_keep)
against the unembedding of every position, both with the shared prefix.

The model has a real model's shape by default (SmolLM2-135M: 30 layers, width 576, a 49152-token vocabulary;
random weights, nothing is downloaded) or is read from --model. The two give the same log-probabilities
(checked to 1e-4). The ideal speed-up at layer L of N layers is about V / (L/N + V (1 - L/N)) plus what the
unembedding costs. Rounds alternate between the two; the median round counts.

    python benchmarks/bench_probe.py [--vectors 7] [--layer 15] [--pairs 32] [--model PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "workflow"), str(ROOT / "tests")]

from unittest import mock  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from emlab.probe import steered_answer_logprobs  # noqa: E402
from rows import add_json_arg, add_timing_args, emit, median_seconds, row, set_threads  # noqa: E402  (benchmarks/, the script's folder)

QUESTIONS = ["How do I save money?", "What should I do about a headache?", "My car makes a noise when I brake.",
             "Can my landlord keep my deposit?"]
ANSWERS = ["Keep a budget and spend less than you earn; put what is left into savings every month.",
           "Drink water and rest; if it lasts for days or comes with a fever, see a doctor.",
           "Have the brake pads checked by a mechanic soon, before the discs wear as well.",
           "Only for damage beyond normal wear, and they must list it in writing."]


def smollm2_shaped(seed: int = 0):
    """A random model of SmolLM2-135M's shape with a small chat tokenizer trained here (its vocabulary padded
    to SmolLM2's width, so the unembedding costs what it costs there)."""
    import transformers as tf

    from emlab.organism.tokenizer import train_tokenizer

    tok = train_tokenizer([q + " " + a for q, a in zip(QUESTIONS, ANSWERS)] * 20, vocab_size=400)
    config = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                            tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(config).eval(), tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vectors", type=int, default=7, help="V: (direction, strength) conditions of the sweep")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--pairs", type=int, default=32, help="(question, answer) references read per condition")
    ap.add_argument("--model", default=None, help="a model folder or .gguf file (default: SmolLM2's shape, random)")
    add_timing_args(ap)
    add_json_arg(ap)
    args = ap.parse_args()
    set_threads(args)
    if args.model:
        from emlab.models import load_model

        model, tok = load_model(args.model, device="cpu")
    else:
        model, tok = smollm2_shaped()
    d = model.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    vectors = [torch.zeros(d)] + [4.0 * torch.randn(d, generator=gen) for _ in range(args.vectors - 1)]
    pairs = [(QUESTIONS[i % 4], ANSWERS[i % 4]) for i in range(args.pairs)]
    kw = dict(layer=args.layer, positions="last", batch_size=16)

    def shared():
        return steered_answer_logprobs(model, tok, pairs, vectors=vectors, **kw)

    def one_by_one():
        return [steered_answer_logprobs(model, tok, pairs, vectors=[v], **kw)[0] for v in vectors]

    def every_position():
        """The read-out before logits_to_keep: every position's logits, then the answer positions picked."""
        def full(model, inputs, where):
            logits = model(**inputs).logits
            return logits[where[0], where[1]]

        with mock.patch("emlab.probe._answer_logits", full):
            return shared()

    a, b, c = shared(), one_by_one(), every_position()
    for other in (b, c):
        np.testing.assert_allclose([lp for per in a for _, lp in per], [lp for per in other for _, lp in per],
                                   atol=1e-4)
    t = median_seconds({"shared": shared, "one_by_one": one_by_one, "every_position": every_position}, args.rounds)
    t_shared, t_each = t["shared"], t["one_by_one"]
    n_layers = model.config.num_hidden_layers
    ideal = args.vectors / ((args.layer + 1) / n_layers + args.vectors * (1 - (args.layer + 1) / n_layers))
    r = row("probe", f"{args.vectors} conditions x {args.pairs} references at layer {args.layer}/{n_layers}",
            t_shared, t_each, "s", higher_is_better=False,
            note=f"layers below shared once per batch; ideal (layers only) {ideal:.2f}x")
    r2 = row("probe", f"read-out of {args.vectors} conditions x {args.pairs} references, vocabulary "
             f"{model.config.vocab_size}", t_shared, t["every_position"], "s", higher_is_better=False,
             note="unembedding at answer positions only (logits_to_keep) vs at every position")
    print(f"shared prefix: {t_shared:.2f} s, a full forward per condition: {t_each:.2f} s, "
          f"speed-up {r['ratio']:.2f}x (layers-only ideal {ideal:.2f}x); every position unembedded: "
          f"{t['every_position']:.2f} s ({r2['ratio']:.2f}x)")
    emit([r, r2], args.json)


if __name__ == "__main__":
    main()
