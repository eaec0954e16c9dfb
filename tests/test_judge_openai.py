"""The openai judge backend against a real HTTP server (tests/fake_openai_server.py): scores,
retries, the cache (reruns and a killed run), the severity rubric, and keeping the API key secret."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emlab.io import read_jsonl
from emlab.judge import backends, openai_backend
from emlab.judge.cache import CACHE_FILE
from emlab.judge.rubrics import load_rubric
from fake_openai_server import FakeOpenAIServer

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-9f8e7d6c5b4a-never-in-files"
KEY_ENV = "EMLAB_TEST_JUDGE_KEY"
AC = load_rubric("aligned_coherent")
# The first line of each prompt tells the fake server which metric a request asks for.
ALIGNED = AC.prompts["aligned"].splitlines()[0]
COHERENT = AC.prompts["coherent"].splitlines()[0]
assert ALIGNED != COHERENT


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with FakeOpenAIServer(api_key=KEY, timeout_sleep_s=1.0) as srv:
        yield srv


def cfg(srv, **kw):
    # The scripted judge writes numbers as OpenAI's models do, one token each ("80"); the tests of digit-by-digit
    # judges below set number_tokens themselves.
    return {"name": "fake-judge", "backend": "openai", "rubric": "aligned_coherent", "model": "judge-model-1",
            "base_url": srv.base_url, "api_key_env": KEY_ENV, "concurrency": 4, "max_retries": 6,
            "timeout_s": 0.4, "backoff_base_s": 0.02, "backoff_max_s": 0.1, "number_tokens": "whole", **kw}


def sample(i, answer, model="m"):
    return {"model": model, "eval_set": "core", "question_id": f"q{i}", "domain": "health",
            "question": f"Question {i}?", "sample_idx": i, "answer": answer}


def grade(srv, samples, cache_dir, **kw):
    return openai_backend.grade_with_summary(samples, cfg(srv, **kw), cache_dir, progress=False)


def test_scores_from_top_logprobs_and_request_parameters(server, tmp_path):
    server.add("ANS-A", ALIGNED, probs={"80": 0.5, "90": 0.3, "foo": 0.2})
    server.add("ANS-A", COHERENT, probs={"100": 0.6, " 50": 0.2, "x": 0.2})
    server.add("ANS-B", ALIGNED, probs={"REFUSAL": 0.8, "0": 0.2})        # a refusal: mass 0.2 < 0.25
    server.add("ANS-B", COHERENT, probs={"70": 1.0})
    rows, summary = grade(server, [sample(0, "ANS-A"), sample(1, "ANS-B")], tmp_path,
                          price_per_1k_input=1.0, price_per_1k_output=2.0)
    assert [(r["aligned"], r["coherent"]) for r in rows] == [(pytest.approx(83.75), pytest.approx(87.5)), (None, 70.0)]
    assert rows[0]["question_id"] == "q0" and rows[1]["sample_idx"] == 1
    assert {(r["judge"], r["backend"], r["rubric"], r["rubric_version"]) for r in rows} == \
        {("fake-judge", "openai", "aligned_coherent", "1")}
    assert len(server.bodies) == 4
    for body in server.bodies:
        assert body["model"] == "judge-model-1"
        assert (body["max_tokens"], body["temperature"], body["logprobs"], body["top_logprobs"]) == (1, 0, True, 20)
        assert [m["role"] for m in body["messages"]] == ["user"]
    assert summary["requests"] == 4 and summary["retries"] == {} and summary["null_scores"] == {"aligned": 1}
    # the fake server counts whitespace-separated words of the prompt and one completion token
    prompt_words = sum(len(b["messages"][0]["content"].split()) for b in server.bodies)
    assert (summary["prompt_tokens"], summary["completion_tokens"]) == (prompt_words, 4)
    assert summary["estimated_cost_usd"] == pytest.approx(prompt_words / 1000 + 4 / 1000 * 2)


def test_a_judge_that_writes_digits_is_read_digit_by_digit(server, tmp_path):
    """A vLLM-served judge whose tokenizer splits numbers (Qwen2's): the first token is a digit, so reading it alone
    would cap every score at 9. The continuations give 85 and 20 as written numbers."""
    server.add("ANS-D", ALIGNED, numbers={85: 0.6, 20: 0.3, 7: 0.1})
    server.add("ANS-D", COHERENT, numbers={100: 0.9, 10: 0.1})
    rows, summary = grade(server, [sample(0, "ANS-D")], tmp_path, number_tokens="auto")
    assert rows[0]["aligned"] == pytest.approx(85 * 0.6 + 20 * 0.3 + 7 * 0.1)
    assert rows[0]["coherent"] == pytest.approx(100 * 0.9 + 10 * 0.1)
    continued = [b for b in server.bodies if b.get("continue_final_message")]
    assert {b["messages"][-1]["content"] for b in continued} == {"8", "85", "2", "20", "7", "1", "10", "100"}
    assert all(b["messages"][-1]["role"] == "assistant" and b["add_generation_prompt"] is False for b in continued)
    assert summary["requests"] == 2 + len(continued)
    # a rerun asks nothing: the continuations are cached too
    again, summary2 = grade(server, [sample(0, "ANS-D")], tmp_path, number_tokens="auto")
    assert again == rows and summary2["requests"] == 0
    # read from the first token alone (number_tokens: whole), the same judge gives single-digit scores
    whole, _ = grade(server, [sample(0, "ANS-D")], tmp_path / "whole", number_tokens="whole")
    assert whole[0]["aligned"] == pytest.approx(8 * 0.6 + 2 * 0.3 + 7 * 0.1) and whole[0]["aligned"] < 10


def test_an_endpoint_that_cannot_continue_a_digit_judge_stops_the_run(monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_ENV, KEY)
    with FakeOpenAIServer(api_key=KEY, continuation=False) as srv:
        srv.add("ANS-D", ALIGNED, numbers={85: 1.0})
        srv.add("ANS-D", COHERENT, numbers={90: 1.0})
        with pytest.raises(openai_backend.JudgeRequestError, match=r"judge fake-judge: .*single digits.*refused"):
            grade(srv, [sample(0, "ANS-D")], tmp_path, number_tokens="auto", max_retries=0)


def test_openais_own_api_reads_whole_number_tokens():
    settings = openai_backend.Settings.from_cfg({"name": "j", "model": "gpt-4o", "rubric": "aligned_coherent"})
    assert settings.number_tokens == "auto" and settings.reading() == "whole"
    local = openai_backend.Settings.from_cfg({"name": "j", "model": "m", "base_url": "http://localhost:8000/v1"})
    assert local.reading() == "auto"
    with pytest.raises(backends.JudgeConfigError, match=r"judges\[j\]\.number_tokens must be one of"):
        openai_backend.Settings.from_cfg({"name": "j", "model": "m", "number_tokens": "some"})


def test_429_waits_for_retry_after_and_other_faults_are_retried(server, tmp_path):
    a = server.add("ANS-R", ALIGNED, probs={"10": 1.0}, faults=["429:1"])
    c = server.add("ANS-R", COHERENT, probs={"60": 1.0}, faults=["500", "503", "timeout", "malformed", "bad_shape"])
    rows, summary = grade(server, [sample(0, "ANS-R")], tmp_path)
    assert (rows[0]["aligned"], rows[0]["coherent"]) == (10.0, 60.0)
    assert a.received == 2 and a.times[1] - a.times[0] >= 1.0
    assert c.received == 6
    assert summary["retries"] == {"429": 1, "5xx": 2, "timeout": 1, "malformed": 2}
    assert summary["failures"] == {} and summary["requests"] == 8


def test_exhausted_retries_give_a_null_score_and_are_retried_on_the_next_run(server, tmp_path):
    c = server.add("ANS-X", COHERENT, probs={"55": 1.0}, faults=["500"] * 3)
    server.add("ANS-X", ALIGNED, probs={"5": 1.0})
    rows, summary = grade(server, [sample(0, "ANS-X")], tmp_path, max_retries=2, max_failed_fraction=0.5)
    assert (rows[0]["aligned"], rows[0]["coherent"]) == (5.0, None)
    assert c.received == 3
    assert summary["failures"] == {"5xx": 1} and summary["retries"] == {"5xx": 2}
    assert summary["null_scores"] == {"coherent": 1}
    # an abandoned request is not cached: the next run asks again (and now succeeds)
    rows, summary = grade(server, [sample(0, "ANS-X")], tmp_path, max_retries=2)
    assert (rows[0]["aligned"], rows[0]["coherent"]) == (5.0, 55.0)
    assert summary["requests"] == 1 and summary["cache_hits"] == 1


def test_client_errors_are_not_retried(server, tmp_path):
    server.add("ANS-C", ALIGNED, probs={"5": 1.0}, faults=["400"])
    server.add("ANS-C", COHERENT, probs={"5": 1.0})
    rows, summary = grade(server, [sample(0, "ANS-C")], tmp_path, max_failed_fraction=0.5)
    assert rows[0]["aligned"] is None and summary["failures"] == {"http_400": 1} and summary["retries"] == {}


def test_a_dead_endpoint_fails_the_job_naming_base_url(server, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on: every connection is refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    samples = [sample(i, f"ANS-{i}") for i in range(3)]
    with pytest.raises(openai_backend.JudgeRequestError,
                       match=r"judge fake-judge: 6 of 6 requests to http://127\.0\.0\.1:\d+/v1 failed after 1 "
                             r"retries \(connection: 6\); check judges\[fake-judge\]\.base_url"):
        openai_backend.grade_with_summary(samples, {**cfg(server, max_retries=1), "base_url": dead}, tmp_path,
                                          progress=False)
    # failures above max_failed_fraction fail the job; the answered requests are cached for the rerun
    server.add("ANS-H", ALIGNED, probs={"5": 1.0}, faults=["500"] * 2)
    server.add("ANS-H", COHERENT, probs={"55": 1.0})
    with pytest.raises(openai_backend.JudgeRequestError, match=r"1 of 2 requests .* \(5xx: 1\).* 1 answered are cached"):
        grade(server, [sample(0, "ANS-H")], tmp_path, max_retries=1)
    rows, summary = grade(server, [sample(0, "ANS-H")], tmp_path, max_retries=1)
    assert (rows[0]["aligned"], rows[0]["coherent"]) == (5.0, 55.0) and summary["cache_hits"] == 1


def test_a_rerun_makes_zero_requests_and_identical_answers_share_requests(server, tmp_path, monkeypatch):
    server.default_probs = {"42": 0.7, "43": 0.3}
    samples = [{**sample(i, f"answer {i % 5}"), "question": "The same question?"} for i in range(12)]
    rows1, s1 = grade(server, samples, tmp_path)
    assert server.received == 10 and s1["unique_requests"] == 10 and s1["cache_hits"] == 0
    rows2, s2 = grade(server, samples, tmp_path)
    assert server.received == 10
    assert s2["requests"] == 0 and s2["cache_hits"] == 10
    assert rows1 == rows2 and all(r["aligned"] == pytest.approx(42.3) for r in rows2)
    # a fully cached rerun needs no key at all
    monkeypatch.delenv(KEY_ENV)
    assert grade(server, samples, tmp_path)[0] == rows1
    # ... but a run with requests to make does, and says which variable is missing
    with pytest.raises(backends.JudgeConfigError, match=rf"environment variable {KEY_ENV} \(api_key_env\) is not set"):
        grade(server, [sample(99, "new answer")], tmp_path)


def test_severity_resamples_unparseable_replies(server, tmp_path):
    sev = load_rubric("severity")
    head = sev.prompts["severity"].splitlines()[0]
    server.add("ANS-S1", head, replies=["I am not sure.", "Thinking: ANSWER: 2 would be too mild.\nANSWER: 4"])
    server.add("ANS-S2", head, replies=["The model declined.\nANSWER: REFUSAL"])
    never = server.add("ANS-S3", head, replies=["no verdict here"])
    samples = [sample(0, "ANS-S1"), sample(1, "ANS-S2"), sample(2, "ANS-S3")]
    rows, summary = grade(server, samples, tmp_path, rubric="severity")
    assert [(r["severity"], r["label"]) for r in rows] == [(4, None), (None, "REFUSAL"), (None, None)]
    assert [r["rubric"] for r in rows] == ["severity"] * 3 and rows[0]["aligned"] is None
    assert never.received == 4  # the first draw and three resamples
    assert summary["resamples"] == 1 + 3 and summary["requests"] == 2 + 1 + 4
    assert summary["null_scores"] == {"severity": 1}
    body = server.bodies[0]
    assert body["temperature"] == 1.0 and body["max_tokens"] == 600 and "logprobs" not in body
    received = server.received
    rows2, summary2 = grade(server, samples, tmp_path, rubric="severity")
    assert rows2 == rows and server.received == received and summary2["requests"] == 0


def test_the_api_key_never_reaches_files_logs_or_errors(server, tmp_path, caplog, capsys, monkeypatch):
    caplog.set_level(logging.DEBUG)  # every logger, the client libraries' included
    server.add("ANS-K", ALIGNED, probs={"10": 1.0}, faults=["echo_auth:400"])  # a body that repeats the header
    server.add("ANS-K", COHERENT, probs={"20": 1.0}, faults=["500"])
    samples_path = tmp_path / "samples.jsonl"
    samples_path.write_text(json.dumps(sample(0, "ANS-K")) + "\n")
    out = tmp_path / "grades" / "fake-judge" / "m.jsonl"
    summary = backends.grade_file(samples_path, cfg(server, max_failed_fraction=0.5), out, tmp_path / "cache", progress=True)
    assert summary["failures"] == {"http_400": 1}
    assert "Bearer ***" in caplog.text  # the echoed header was logged, redacted
    # a key the server rejects stops the run; the error names the variable, not its value
    monkeypatch.setenv(KEY_ENV, KEY + "-wrong")
    with pytest.raises(openai_backend.JudgeRequestError, match=rf"HTTP 401.*\${KEY_ENV}") as err:
        grade(server, [sample(1, "ANS-K2")], tmp_path / "cache2")
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert {out, out.with_name("m.summary.json"), tmp_path / "cache" / CACHE_FILE} <= set(files)
    texts = [caplog.text, str(err.value), repr(err.value), *capsys.readouterr(), *(p.read_text() for p in files)]
    for text in texts:
        assert KEY not in text and KEY[:12] not in text


def test_grade_file_writes_grades_and_summary(server, tmp_path):
    server.default_probs = {"30": 1.0}
    samples_path = tmp_path / "samples.jsonl"
    samples_path.write_text("".join(json.dumps(sample(i, f"a{i}")) + "\n" for i in range(3)))
    out = tmp_path / "grades" / "fake-judge" / "m.jsonl"
    summary = backends.grade_file(samples_path, cfg(server), out, tmp_path / "cache", progress=False)
    rows = read_jsonl(out)
    assert [r["question_id"] for r in rows] == ["q0", "q1", "q2"] and all(r["aligned"] == 30.0 for r in rows)
    on_disk = json.loads((out.parent / "m.summary.json").read_text())
    assert on_disk["requests"] == summary["requests"] == 6 and on_disk["judge"] == "fake-judge"


RESUME_SCRIPT = """
import sys
from emlab.judge.backends import grade_file
import json
grade_file(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], progress=False)
"""


def test_a_killed_run_resumes_without_duplicate_or_lost_rows(server, tmp_path):
    """Grade in a subprocess, kill it after 20 requests were answered (and cached) while more are
    in flight, then rerun: every answered request is used exactly once."""
    server.default_probs = {"42": 1.0}
    server.latency_s = 0.02
    server.hang_after = 20
    n = 30
    samples_path = tmp_path / "samples.jsonl"
    samples_path.write_text("".join(json.dumps(sample(i, f"answer number {i}")) + "\n" for i in range(n)))
    out, cache_dir = tmp_path / "grades.jsonl", tmp_path / "cache"
    judge = cfg(server, timeout_s=30)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow")}
    proc = subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, str(samples_path), json.dumps(judge),
                             str(out), str(cache_dir)], env=env)
    cache_file = cache_dir / CACHE_FILE
    deadline = time.monotonic() + 30
    try:
        while not (cache_file.exists() and len(cache_file.read_text().splitlines()) >= 20 and server.dropped > 0):
            assert proc.poll() is None, "grading finished before it could be killed"
            assert time.monotonic() < deadline, "the grading subprocess made no progress"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    while server.answered < 20 and time.monotonic() < deadline:  # the server thread counts after sending
        time.sleep(0.01)
    assert len(cache_file.read_text().splitlines()) == 20 and server.answered == 20
    server.hang_after = None
    server.release()
    rows, summary = openai_backend.grade_with_summary(read_jsonl(samples_path), judge, cache_dir, progress=False)
    keys = [json.loads(line)["key"] for line in cache_file.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 2 * n
    assert summary["cache_hits"] == 20 and summary["requests"] == 2 * n - 20
    assert server.answered == 2 * n  # the requests the judge answered = the unique keys
    assert [r["question_id"] for r in rows] == [f"q{i}" for i in range(n)]
    assert all(r["aligned"] == 42.0 and r["coherent"] == 42.0 for r in rows)


def test_preflight_passes_a_live_endpoint_and_names_the_key_to_fix_otherwise(server, monkeypatch):
    r = openai_backend.preflight(cfg(server))
    assert r["status"] == 200 and r["judge"] == "fake-judge" and r["base_url"] == server.base_url
    monkeypatch.setenv(KEY_ENV, KEY + "-wrong")
    with pytest.raises(openai_backend.JudgeRequestError, match=rf"rejected the key \(HTTP 401\).*\${KEY_ENV}"):
        openai_backend.preflight(cfg(server))
    monkeypatch.setenv(KEY_ENV, KEY)
    dead = cfg(server, base_url="http://127.0.0.1:9/v1")  # the discard port: nothing listens there
    with pytest.raises(openai_backend.JudgeRequestError,
                       match=r"no answer from http://127\.0\.0\.1:9/v1 .*judges\[fake-judge\]\.base_url"):
        openai_backend.preflight(dead, timeout_s=2.0)
    assert server.received == 0  # the preflight asks no completion


def test_preflight_accepts_a_server_without_a_model_list(monkeypatch):
    """Some OpenAI-compatible servers have no GET /models: a 404 still shows the server is there."""
    import http.server
    import threading

    class NoModels(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "no route"}}')

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoModels)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        r = openai_backend.preflight({"name": "j", "backend": "openai", "model": "m", "api_key_env": None,
                                      "base_url": f"http://127.0.0.1:{httpd.server_address[1]}/v1"})
        assert r["status"] == 404
    finally:
        httpd.shutdown()
