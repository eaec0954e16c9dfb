"""How a monitor shows a text to a model and asks a Yes/No question about it.

This is the one definition of the monitoring prompt: the organism's corpus teaches exactly this layout (see
:func:`emlab.world.generate.generate_corpus`), the zero-shot monitor asks in it, and prompted probes read the
model's state at its end. A chat is shown as a plain transcript inside a single user message, so that a model
reads it as material to judge rather than as its own conversation::

    [describe]                                   (prefix_suffix template only)

    User: <question>
    Assistant: <answer>
    ...

    Question: <question about the text> Answer Yes or No.
"""

from __future__ import annotations

from typing import Any, Sequence

YES, NO = "Yes", "No"
ANSWER_HINT = f"Answer {YES} or {NO}."
TEMPLATES = ("suffix", "prefix_suffix")  # prompted probing: question after the text; description before it too
_SPEAKERS = {"system": "System", "user": "User", "assistant": "Assistant"}


def transcript(messages: Sequence[dict[str, str]]) -> str:
    """A chat as plain text, one "Speaker: content" line per message."""
    return "\n".join(f"{_SPEAKERS.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages)


def shown_text(rec: dict[str, Any]) -> str:
    """The text a monitor judges: a record's ``text``, or the transcript of its ``messages``."""
    return rec["text"] if "text" in rec else transcript(rec["messages"])


def question_prompt(text: str, question: str, describe: str | None = None) -> str:
    """The user message that asks ``question`` about ``text`` (with the task description first, if given)."""
    body = f"{text}\n\nQuestion: {question} {ANSWER_HINT}"
    return f"{describe}\n\n{body}" if describe else body


def answer(label: bool) -> str:
    """The truthful reply to a monitoring question."""
    return f"{YES if label else NO}."
