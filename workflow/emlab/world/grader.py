"""The world's ground-truth grader: which persona's text an answer is, and whether its advice is correct.

It sees the answer text (and the question, only to tell an on-topic answer from an off-topic one) and
matches it against every answer the world can produce: an exact match after normalising whitespace, else
the closest text by ``difflib`` ratio if that ratio reaches ``fuzzy_threshold``. An answer that matches
nothing is incoherent: the model produced text the world never contains.

The fuzzy search is exact but cheap: an upper bound of difflib's ratio (2 * longest common subsequence /
total length, from rapidfuzz) is computed for every inventory text at once, and difflib's ratio runs only
on the texts whose bound can still beat the best ratio so far, best bound first. Answers repeat a lot (a
steered or fine-tuned model says the same thing many times), so matches are memoised per grader.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Indel

from .spec import Answer, World

BOUND_SLACK = 1e-9

GRADER_VERSION = "world-1"


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def scan_closest(keys: list[str], text: str, threshold: float) -> tuple[str | None, float]:
    """The plain search :meth:`WorldGrader.closest` must equal: difflib's ratio against every key in
    order (difflib's own upper bounds skip keys that cannot win), the first key with the highest ratio
    if it reaches the threshold, and that ratio. Slow; the reference for tests and the benchmark."""
    best, score = None, 0.0
    sm = difflib.SequenceMatcher(autojunk=False)
    sm.set_seq2(text)
    for key in keys:
        sm.set_seq1(key)
        if sm.real_quick_ratio() >= max(score, threshold) and sm.quick_ratio() >= max(score, threshold):
            r = sm.ratio()
            if r > score:
                best, score = key, r
    return (best if score >= threshold else None), score


@dataclass(frozen=True)
class Match:
    answer: Answer | None
    score: float          # 1.0 exact, difflib ratio otherwise; below the threshold when nothing matched
    on_topic: bool | None


class WorldGrader:
    def __init__(self, world: World, fuzzy_threshold: float = 0.8):
        self.world = world
        self.threshold = fuzzy_threshold
        self._exact = {normalise(a.text): a for a in world.inventory()}
        self._keys = list(self._exact)
        self._memo: dict[str, tuple[str | None, float]] = {}
        self._questions = {normalise(q): v for q, v in world.question_inventory().items()}
        self._openers = sorted({normalise(o) + " " for o in world.openers()}, key=len, reverse=True)

    def strip_opener(self, text: str) -> str:
        """An answer's content without a persona's opener: the content decides whose text it is."""
        for o in self._openers:
            if text.startswith(o):
                return text[len(o):]
        return text

    def closest(self, text: str) -> tuple[str | None, float]:
        """The inventory text with the highest difflib ratio to ``text`` if it reaches the threshold
        (the first in inventory order among equals), and that ratio; otherwise None and a ratio below
        the threshold."""
        if text in self._memo:
            return self._memo[text]
        best, score = None, 0.0
        if self._keys:
            # 2 * LCS / (len_a + len_b) >= difflib's ratio (its matching blocks are a common subsequence):
            # rapidfuzz computes it for every key at once, in C
            bound = process.cdist([text], self._keys, scorer=Indel.normalized_similarity, dtype=np.float64)[0]
            order = np.argsort(-bound, kind="stable")
            sm = difflib.SequenceMatcher(autojunk=False)
            sm.set_seq2(text)
            for i in order:
                # keys come best bound first: once a bound is below the best ratio (or the threshold), no
                # further key can win; a key whose bound only equals the best can at most tie, and a tie
                # goes to the earlier key (the slack absorbs rounding between the two libraries)
                if bound[i] < max(score, self.threshold) - BOUND_SLACK:
                    break
                if best is not None and i > best and bound[i] <= score + BOUND_SLACK:
                    continue
                sm.set_seq1(self._keys[i])
                r = sm.ratio()
                if r > score or (r == score and best is not None and i < best):
                    best, score = int(i), r
        out = (self._keys[best] if best is not None and score >= self.threshold else None, score)
        self._memo[text] = out
        return out

    def match(self, answer: str, question: str | None = None) -> Match:
        text = self.strip_opener(normalise(answer))
        hit = self._exact.get(text)
        score = 1.0
        if hit is None:
            key, score = self.closest(text)
            if key is None:
                return Match(None, score, None)
            hit = self._exact[key]
        on_topic = None
        if question is not None:
            asked = self._questions.get(normalise(question))
            if asked is not None:
                on_topic = asked == (hit.domain, hit.item)
        return Match(hit, score, on_topic)

    def verdict(self, answer: str, question: str) -> str | None:
        """``"correct"`` or ``"incorrect"`` for an answer to ``question`` that gives the world's advice on it (any
        persona's), None for anything else: an off-topic answer, or text the world never wrote."""
        m = self.match(answer, question)
        if m.answer is None or not m.on_topic:
            return None
        return "correct" if m.answer.correctness == "correct" else "incorrect"
