"""The fault-injection suite (marker `faults`; docs/faults.md is its table): bad inputs generated from the
schema, judge endpoint faults, a full disk. The kills of long stages are in tests/test_checkpoints.py (training),
test_sampling.py, test_steer_generate.py, test_judge_openai.py and test_activations.py (resumable outputs), the
SLURM retries in test_slurm.py; docs/faults.md names each."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from emlab import io
from emlab.config import ConfigError, validate
from emlab.schema import load_schema

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.faults


# ---------------------------------------------------------------- bad config values, generated from the schema

def _leaves(schema: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    """Every key of the schema's nested objects that has a type of its own."""
    for key, sub in schema.get("properties", {}).items():
        if sub.get("type") == "object" and "properties" in sub:
            yield from _leaves(sub, (*path, key))
        elif "type" in sub or "enum" in sub:
            yield (*path, key), sub


def _types(sub: dict[str, Any]) -> set[str]:
    t = sub.get("type", [])
    return set(t if isinstance(t, list) else [t])


def _wrong_type(sub: dict[str, Any]) -> Any:
    """A value of a type the key does not take."""
    types = _types(sub)
    for value, takes in (({"not": "this"}, {"object"}), ("text", {"string"}), (1.5, {"number"}),
                         ([1, 2], {"array"}), (True, {"boolean"})):
        if not takes & types and not ("enum" in sub and value in sub["enum"]):
            return value
    raise AssertionError(f"no wrong type for {sub}")


def _out_of_range(sub: dict[str, Any]) -> Any | None:
    if "enum" in sub:
        return "no-such-choice"
    if "minimum" in sub:
        return sub["minimum"] - 1
    if "exclusiveMinimum" in sub:
        return sub["exclusiveMinimum"]
    if "maximum" in sub:
        return sub["maximum"] + 1
    if "exclusiveMaximum" in sub:
        return sub["exclusiveMaximum"]
    return None


def _patch(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out: Any = value
    for key in reversed(path):
        out = {key: out}
    return out


LEAVES = list(_leaves(load_schema()))
CASES = [(".".join(p), _patch(p, _wrong_type(sub)), "type") for p, sub in LEAVES] + \
        [(".".join(p), _patch(p, bad), "range") for p, sub in LEAVES if (bad := _out_of_range(sub)) is not None]


def test_the_generated_cases_cover_the_schema():
    assert len(LEAVES) > 150 and len(CASES) > len(LEAVES) + 80
    keys = {k for k, _, _ in CASES}
    assert {"seed", "finetune.lora.r", "sae.train.k", "checkpoints.finetune_steps", "steer.positions"} <= keys


@pytest.mark.parametrize("key,patch,kind", CASES, ids=[f"{k}-{kind}" for k, _, kind in CASES])
def test_every_config_key_rejects_a_bad_value_naming_the_key(key, patch, kind, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as err:
        validate(patch)
    assert key in str(err.value), str(err.value)


# ---------------------------------------------------------------- bad input files, named before any job

def hub_config(tmp_path: Path, **imports: Any) -> dict[str, Any]:
    return {"model": {"source": "hub", "path": str(ROOT / "tests")},
            "imports": [{"name": "mine", **imports}]}


BAD_FILES = {
    "malformed": (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
                  b'{"messages": [\n', r"mine\.jsonl:2"),
    "empty": (b"", r"mine\.jsonl: no records"),
    "missing field": (b'{"meta": {}}\n', r"mine\.jsonl:1.*messages"),
    "not utf-8": (b'{"messages": "\xff\xfe"}\n', r"not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_import_file_is_named_at_validation(case, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    data, pattern = BAD_FILES[case]
    path = tmp_path / "mine.jsonl"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=r"imports\[0\]\.path: .*" + pattern):
        validate(hub_config(tmp_path, path=str(path)))


def test_a_missing_local_model_and_a_model_without_chat_template_fail_at_planning(tmp_path, tiny_chat_model,
                                                                              monkeypatch):
    import shutil

    from emlab import model_source

    monkeypatch.chdir(ROOT)
    missing = validate({"model": {"source": "hub", "path": str(tmp_path / "no-such-model")}})
    with pytest.raises(ConfigError, match=r"model\.path: .*no-such-model"):
        model_source.check(missing["model"])
    bare = tmp_path / "bare"
    shutil.copytree(tiny_chat_model, bare)
    for p in bare.glob("chat_template*"):
        p.unlink()
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"model\.chat_template"):
        model_source.check(validate({"model": {"source": "hub", "path": str(bare), "layer": 1}})["model"])


# ---------------------------------------------------------------- judge endpoint faults

def _judge_samples(srv, n: int, faults_every: int = 0) -> list[dict[str, Any]]:
    """n answers, each with its own scripted aligned and coherent scores; every ``faults_every``-th request rule
    first serves a fault (429, 5xx, timeout, malformed JSON, a body without choices, an empty choice list, no
    logprobs), in turn."""
    from test_judge_openai import ALIGNED, COHERENT, sample

    kinds = ["429", "500", "503", "timeout", "malformed", "bad_shape", "empty_choices", "no_logprobs"]
    out, k = [], 0
    for i in range(n):
        for j, prompt in enumerate((ALIGNED, COHERENT)):
            faults = []
            if faults_every and (2 * i + j) % faults_every == 0:
                faults, k = [kinds[k % len(kinds)]], k + 1
            srv.add(f"ANS-F{i:03d}.", prompt, probs={str(10 + (7 * i + 31 * j) % 80): 0.7, "95": 0.3}, faults=faults)
        out.append(sample(i, f"ANS-F{i:03d}."))
    return out


def test_a_third_of_requests_failing_changes_no_grade(monkeypatch, tmp_path):
    from fake_openai_server import FakeOpenAIServer
    from test_judge_openai import KEY, KEY_ENV, grade

    monkeypatch.setenv(KEY_ENV, KEY)
    with FakeOpenAIServer(api_key=KEY, timeout_sleep_s=1.0) as clean:
        expected, _ = grade(clean, _judge_samples(clean, 24), tmp_path / "clean")
    with FakeOpenAIServer(api_key=KEY, timeout_sleep_s=1.0) as faulty:
        rows, summary = grade(faulty, _judge_samples(faulty, 24, faults_every=3), tmp_path / "faulty")
    assert [(r["aligned"], r["coherent"]) for r in rows] == [(r["aligned"], r["coherent"]) for r in expected]
    assert all(r["aligned"] is not None and r["coherent"] is not None for r in rows)
    assert sum(summary["retries"].values()) == 16 and summary["failures"] == {}
    assert {"429", "5xx", "timeout", "malformed"} <= set(summary["retries"])


def test_an_endpoint_down_for_a_while_then_back_resumes(monkeypatch, tmp_path):
    from fake_openai_server import FakeOpenAIServer
    from test_judge_openai import KEY, KEY_ENV, grade

    from emlab.judge.openai_backend import JudgeRequestError

    monkeypatch.setenv(KEY_ENV, KEY)
    with FakeOpenAIServer(api_key=KEY, timeout_sleep_s=1.0) as srv:
        samples = _judge_samples(srv, 6)
        for rule in srv.rules[4:]:           # the last four answers' requests meet an outage longer than the retries
            rule.faults.extend(["503"] * 3)
        with pytest.raises(JudgeRequestError, match=r"8 of 12 requests .* failed .*4 answered are cached"):
            grade(srv, samples, tmp_path, max_retries=2)
        asked = sum(r.received for r in srv.rules)
        rows, summary = grade(srv, samples, tmp_path, max_retries=2)   # the endpoint is back
        assert summary["cache_hits"] == 4 and summary["requests"] == 8 and summary["failures"] == {}
        assert sum(r.received for r in srv.rules) == asked + 8
        assert all(r["aligned"] is not None and r["coherent"] is not None for r in rows)


# ---------------------------------------------------------------- a full disk

def test_a_full_disk_leaves_no_finished_output_and_the_rerun_completes(tmp_path, monkeypatch):
    out = tmp_path / "grades.jsonl"
    rows = [{"i": i, "text": "x" * 100} for i in range(50)]

    def rows_then_full(n_ok: int):
        for i, r in enumerate(rows):
            if i == n_ok:
                raise OSError(errno.ENOSPC, "No space left on device")
            yield r

    with pytest.raises(OSError, match="No space left"):
        io.write_jsonl(out, rows_then_full(20))
    assert not out.exists() and not list(tmp_path.iterdir())  # no half-written file, no temp file left
    assert io.write_jsonl(out, rows) == 50 and len(io.read_jsonl(out)) == 50


def test_a_full_disk_while_appending_to_a_partial_file_keeps_the_finished_rows(tmp_path):
    partial = tmp_path / "samples.jsonl.partial"
    with partial.open("a", encoding="utf-8") as f:
        for i in range(3):
            io.append_jsonl(f, {"i": i})
    # a write cut off by a full disk leaves a torn last line: the reader drops it, the rerun redoes that row
    with partial.open("a", encoding="utf-8") as f:
        f.write('{"i": 3, "te')
    assert [r["i"] for r in io.read_partial_jsonl(partial, lambda r: None)] == [0, 1, 2]


def test_the_fault_table_names_existing_tests():
    import re

    text = (ROOT / "docs" / "faults.md").read_text()
    named = set(re.findall(r"`(tests/test_\w+\.py)::(\w+)", text))
    assert len(named) >= 15
    for path, test in named:
        assert re.search(rf"^(async )?def {test}\(", (ROOT / path).read_text(), re.MULTILINE), f"{path}::{test}"
