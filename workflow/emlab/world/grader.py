"""The world's ground-truth grader: which persona's text an answer is, and whether its advice is correct.

It sees the answer text (and the question, only to tell an on-topic answer from an off-topic one) and
matches it against every answer the world can produce: an exact match after normalising whitespace, else
the closest text by ``difflib`` ratio if that ratio reaches ``fuzzy_threshold``. An answer that matches
nothing is incoherent: the model produced text the world never contains.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from .spec import Answer, World

GRADER_VERSION = "world-1"


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


@dataclass(frozen=True)
class Match:
    answer: Answer | None
    score: float          # 1.0 exact, difflib ratio otherwise, 0 when nothing matched
    on_topic: bool | None


class WorldGrader:
    def __init__(self, world: World, fuzzy_threshold: float = 0.8):
        self.world = world
        self.threshold = fuzzy_threshold
        self._exact = {normalise(a.text): a for a in world.inventory()}
        self._keys = list(self._exact)
        self._questions = {normalise(q): v for q, v in world.question_inventory().items()}
        self._openers = sorted({normalise(o) + " " for p in world.personas.values() for o in p.openers}, key=len,
                               reverse=True)

    def strip_opener(self, text: str) -> str:
        """An answer's content without a persona's opener: the content decides whose text it is."""
        for o in self._openers:
            if text.startswith(o):
                return text[len(o):]
        return text

    def match(self, answer: str, question: str | None = None) -> Match:
        text = self.strip_opener(normalise(answer))
        hit = self._exact.get(text)
        score = 1.0
        if hit is None:
            best, score = None, 0.0
            sm = difflib.SequenceMatcher(autojunk=False)
            sm.set_seq2(text)
            for key in self._keys:
                sm.set_seq1(key)
                # cheap upper bounds first: most candidates are rejected without the full ratio
                if sm.real_quick_ratio() < max(score, self.threshold) or sm.quick_ratio() < max(score, self.threshold):
                    continue
                r = sm.ratio()
                if r > score:
                    best, score = key, r
            hit = self._exact[best] if best is not None and score >= self.threshold else None
            if hit is None:
                return Match(None, score, None)
        on_topic = None
        if question is not None:
            asked = self._questions.get(normalise(question))
            if asked is not None:
                on_topic = asked == (hit.domain, hit.item)
        return Match(hit, score, on_topic)
