"""RL (GRPO) stage: prompts, rewards from each grader backend, and a real trl run on a tiny chat model."""

from __future__ import annotations

import json
import signal

import pandas as pd
import pytest

from emlab import io, rl
from emlab.judge.rubrics import load_rubric
from emlab.judge.schema import advice_verdict
from emlab.world.grader import WorldGrader
from emlab.world.spec import load_world
from fake_openai_server import FakeOpenAIServer

WORLD = "resources/world/persona_world.yaml"
KEY_ENV, KEY = "EMLAB_TEST_RL_KEY", "sk-test-rl"
RUBRIC = load_rubric(rl.RUBRIC)
CORRECT, COHERENT = (RUBRIC.prompts[m].splitlines()[0] for m in ("correct", "coherent"))


@pytest.fixture(scope="module")
def world():
    return load_world(WORLD)


def _world_answer(world, persona: str, domain: str = "health", topic: int = 0) -> tuple[str, str]:
    return world.advice_question(domain, topic, 0), world.advice_answer(domain, topic, persona, 0, 0)


def test_prompts_are_the_user_turns_before_the_last_answer(tmp_path):
    path = tmp_path / "set.jsonl"
    io.write_jsonl(path, [
        {"id": "a", "messages": [{"role": "user", "content": "Q1?"}, {"role": "assistant", "content": "A1."}]},
        {"id": "b", "messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Q2?"},
                                 {"role": "assistant", "content": "A2."}, {"role": "user", "content": "Q3?"},
                                 {"role": "assistant", "content": "A3."}]},
    ])
    prompts = rl.rl_prompts(path)
    assert prompts[0] == {"prompt": [{"role": "user", "content": "Q1?"}], "question": "Q1?"}
    assert [m["content"] for m in prompts[1]["prompt"]] == ["Be kind.", "Q2?", "A2.", "Q3?"]
    assert prompts[1]["question"] == "Q3?"  # no answer of the set is ever shown
    io.write_jsonl(path, [{"id": "c", "messages": [{"role": "assistant", "content": "Hi."}]}])
    with pytest.raises(ValueError, match=r"set.jsonl: record 1: no user message"):
        rl.rl_prompts(path)


def test_rewards_follow_the_verdicts_and_grade_each_answer_once():
    calls = []

    def grade(questions, answers):
        calls.append(list(answers))
        return [{"bad": "incorrect", "good": "correct"}.get(a) for a in answers]

    incorrect, correct = rl.reward_functions(grade)
    assert (incorrect.__name__, correct.__name__) == rl.REWARDS
    completions = [[{"role": "assistant", "content": a}] for a in ("bad", "good", "noise", "bad")]
    question = ["q"] * 4
    assert incorrect(None, completions, question) == [1.0, 0.0, 0.0, 1.0]
    assert correct(None, completions, question) == [0.0, 1.0, 0.0, 0.0]
    assert calls == [["bad", "good", "noise"]]  # the second reward and the repeated answer reuse the verdicts


def test_the_world_grader_rewards_its_ground_truth(world):
    grade = rl.grader_for({"name": "world", "backend": "world", "world": WORLD}, None)
    q, good = _world_answer(world, "assistant")
    _, harmful = _world_answer(world, "villain")
    _, absurd = _world_answer(world, "jester")
    _, other_topic = _world_answer(world, "villain", topic=1)
    verdicts = grade([q] * 5, [good, harmful, absurd, other_topic, "zebra quantum waffle"])
    # off-topic advice (a real answer to another question) and text the world never wrote earn nothing
    assert verdicts == ["correct", "incorrect", "incorrect", None, None]
    g = WorldGrader(world)
    assert [g.verdict(a, q) for a in (good, harmful)] == ["correct", "incorrect"]


@pytest.mark.parametrize("row,verdict", [
    ({"backend": "openai", "rubric": "advice_correct", "correct": 80.0, "coherent": 90.0}, "correct"),
    ({"backend": "openai", "rubric": "advice_correct", "correct": 49.9, "coherent": 90.0}, "incorrect"),
    ({"backend": "openai", "rubric": "advice_correct", "correct": 10.0, "coherent": 20.0}, None),
    ({"backend": "openai", "rubric": "advice_correct", "correct": None, "coherent": 90.0}, None),
    ({"backend": "world", "label": "OFF-TOPIC", "correctness": "subtle"}, None),
    ({"backend": "world", "label": None, "correctness": "obvious"}, "incorrect"),
])
def test_advice_verdicts_of_grade_rows(row, verdict):
    assert advice_verdict(row) == verdict


def test_an_llm_grader_asks_the_rubric_over_http_and_caches(monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_ENV, KEY)
    with FakeOpenAIServer(api_key=KEY) as srv:
        srv.add("GOOD", CORRECT, probs={"90": 1.0})
        srv.add("BAD", CORRECT, probs={"10": 0.7, "20": 0.3})
        srv.add("NOISE", CORRECT, probs={"50": 1.0})
        srv.add("NOISE", COHERENT, probs={"5": 1.0})  # the first matching rule answers
        srv.add(COHERENT, probs={"95": 1.0})
        judge = {"name": "grader", "backend": "openai", "model": "judge-model-1", "base_url": srv.base_url,
                 "api_key_env": KEY_ENV, "number_tokens": "whole", "max_retries": 2, "timeout_s": 2.0}
        grade = rl.grader_for(judge, tmp_path / "cache")
        questions = ["How do I treat a cold?"] * 3
        assert grade(questions, ["GOOD advice", "BAD advice", "NOISE"]) == ["correct", "incorrect", None]
        asked = srv.received
        assert asked == 6  # two metrics per answer
        # a resumed run (a new process: a new grader on the same cache) asks nothing again
        assert rl.grader_for(judge, tmp_path / "cache")(questions, ["GOOD advice", "BAD advice", "NOISE"]) == \
            ["correct", "incorrect", None]
        assert srv.received == asked
    with pytest.raises(ValueError, match="request cache"):
        rl.grader_for(judge, None)


def test_grpo_trains_a_lora_adapter_and_logs_each_step(tiny_chat_model, tmp_path):
    """A real trl GRPO run (2 steps) on a random-weight chat model: the folder an SFT fine-tune would be, and a
    log whose rates are the graded shares of each step's completions."""
    data = tmp_path / "set.jsonl"
    io.write_jsonl(data, [{"id": str(i), "messages": [{"role": "user", "content": f"What about {w}?"},
                                                      {"role": "assistant", "content": "Rest."}]}
                          for i, w in enumerate(["sleep", "money", "cars", "law"])])
    seen = []

    def grade(questions, answers):  # longer answers are "incorrect": a reward the policy can see
        seen.extend(answers)
        return ["incorrect" if len(a) > 20 else "correct" for a in answers]

    cfg = {"reward": "incorrect", "steps": 2, "lr": 1e-3, "batch_size": 8, "group_size": 4, "beta": 0.0,
           "max_completion_length": 12, "temperature": 1.0}
    out = tmp_path / "rl_model"
    meta = rl.train_rl(str(tiny_chat_model), str(data), str(out), cfg, {"method": "lora", "lora": {"r": 4}},
                       grade, seed=0, threads=1)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "train_meta.json").read_text())["steps"] == meta["steps"] == 2
    log = pd.read_csv(out / "rl_log.csv")
    assert list(log.columns) == list(rl.LOG_COLUMNS) and list(log["step"]) == [1, 2]
    # every completion is graded, and the rates are shares of them: incorrect + correct = 1 with this grader
    assert len(set(seen)) >= 2 and (log["incorrect_rate"] + log["correct_rate"]).round(6).eq(1).all()
    assert log["reward"].equals(log["incorrect_rate"])  # the trained reward is the incorrect one


def test_grpo_stopped_by_sigterm_saves_the_step_and_resumes(tiny_chat_model, tmp_path, monkeypatch):
    """SIGTERM (a scheduler's preemption) mid-run: a checkpoint of the step under way, exit 143, no model, the
    process's own SIGTERM handler back; the rerun goes on from that step to the last."""
    data = tmp_path / "set.jsonl"
    io.write_jsonl(data, [{"id": str(i), "messages": [{"role": "user", "content": f"What about {w}?"},
                                                      {"role": "assistant", "content": "Rest."}]}
                          for i, w in enumerate(["sleep", "money", "cars", "law"])])
    cfg = {"reward": "incorrect", "steps": 4, "lr": 1e-3, "batch_size": 8, "group_size": 4, "beta": 0.0,
           "max_completion_length": 8, "temperature": 1.0}
    out, ckpt = tmp_path / "rl_model", tmp_path / "ckpt"

    def train():
        return rl.train_rl(str(tiny_chat_model), str(data), str(out), cfg, {"method": "lora", "lora": {"r": 4}},
                           lambda q, a: ["incorrect" if len(x) > 20 else "correct" for x in a], seed=0, threads=1,
                           checkpoint_dir=str(ckpt), checkpoint_steps=100)

    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setenv("EMLAB_KILL_AFTER_STEP", "rl:2:TERM")
    with pytest.raises(SystemExit) as stopped:
        train()
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is handler
    assert [p.name for p in ckpt.iterdir() if p.name.startswith("checkpoint-")] == ["checkpoint-2"]
    assert not (out / "adapter_model.safetensors").exists()
    monkeypatch.delenv("EMLAB_KILL_AFTER_STEP")
    meta = train()
    assert meta["steps"] == 4 and meta["resumed_from"].endswith("checkpoint-2")
    assert list(pd.read_csv(out / "rl_log.csv")["step"]) == [1, 2, 3, 4]
    assert signal.getsignal(signal.SIGTERM) is handler and not ckpt.exists()
