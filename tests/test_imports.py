"""Imported fine-tuning sets: local chat JSONL and `datasets` folders pass through unchanged in the dataset
schema; a bad record stops the import naming its file and line (or row); config checks name the key."""

import json

import pytest

from emlab.config import ConfigError, validate
from emlab.imports import check_config, hub_dataset_names, import_dataset
from emlab.io import RecordError


def chat(q, a, **extra):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **extra}


def write_lines(path, lines):
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


def entry(**kw):
    return {"name": "insecure", "path": None, "hub": None, "subset": None, "split": "train",
            "messages_field": "messages", "n": None, "meta": {}, **kw}


def test_good_file_is_imported_unchanged_with_ids_and_meta(tmp_path):
    path = write_lines(tmp_path / "good.jsonl", [
        chat("Write a function that copies a file.", "def copy(a, b): ...", id="orig-7"),
        "",  # blank lines are skipped
        {"messages": [{"role": "system", "content": "You write code."}, {"role": "user", "content": "Sort a list."},
                      {"role": "assistant", "content": "sorted(xs)", "weight": 1}], "meta": {"domain": "python"}},
    ])
    rows = import_dataset(entry(path=str(path), meta={"domain": "code", "correctness": "insecure"}))
    assert rows == [
        {"id": "orig-7", "messages": chat("Write a function that copies a file.", "def copy(a, b): ...")["messages"],
         "meta": {"source": str(path), "origin": f"{path}:1", "domain": "code", "correctness": "insecure"}},
        {"id": "insecure_00001",
         "messages": [{"role": "system", "content": "You write code."}, {"role": "user", "content": "Sort a list."},
                      {"role": "assistant", "content": "sorted(xs)"}],
         "meta": {"source": str(path), "origin": f"{path}:3", "domain": "python", "correctness": "insecure"}},
    ]


@pytest.mark.parametrize("bad,message", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}',
     "messages[1].role must be one of ['assistant', 'system', 'user'], got 'bot'"),
    ('{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "the last message must be the assistant's"),
    ('{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]}',
     "no user message before the final assistant message"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}',
     "the final assistant message is empty"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "meta": [1]}',
     "'meta' must be an object"),
])
def test_bad_record_is_named_by_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "bad.jsonl", [chat("q1", "a1"), "", chat("q2", "a2"), bad, chat("q3", "a3")])
    with pytest.raises(RecordError) as e:
        import_dataset(entry(path=str(path)))
    assert str(e.value).startswith(f"{path}:4: ")
    assert message in str(e.value)


def test_subset_is_seeded_and_keeps_file_order(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [chat(f"q{i}", f"a{i}") for i in range(20)])
    rows = import_dataset(entry(path=str(path), n=5), seed=0)
    lines = [int(r["meta"]["origin"].rsplit(":", 1)[1]) for r in rows]
    assert len(rows) == 5 and lines == sorted(lines) and len(set(lines)) == 5
    assert [r["messages"][0]["content"] for r in rows] == [f"q{n - 1}" for n in lines]
    assert rows == import_dataset(entry(path=str(path), n=5), seed=0)
    assert rows != import_dataset(entry(path=str(path), n=5), seed=1)
    with pytest.raises(ValueError, match=r"n=21 but .* holds only 20 records"):
        import_dataset(entry(path=str(path), n=21))


@pytest.fixture
def local_hub_dataset(tmp_path, monkeypatch):
    """A folder that `datasets.load_dataset` reads like a hub dataset (offline), with a private cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    folder = tmp_path / "hub_ds"
    folder.mkdir()
    return folder


def test_hub_dataset_rows_are_validated_and_named_by_row(local_hub_dataset):
    write_lines(local_hub_dataset / "train.jsonl", [{"conversation": chat("q0", "a0")["messages"], "id": "r0"},
                                                    {"conversation": chat("q1", "a1")["messages"], "id": "r1"}])
    rows = import_dataset(entry(name="convs", hub=str(local_hub_dataset), messages_field="conversation"))
    assert [r["id"] for r in rows] == ["r0", "r1"]
    assert rows[1]["messages"] == chat("q1", "a1")["messages"]
    assert rows[1]["meta"] == {"source": f"hub:{local_hub_dataset}",
                               "origin": f"{local_hub_dataset} (split train) row 1"}
    with pytest.raises(RecordError, match=r"no column 'messages' \(columns: conversation, id\)"):
        import_dataset(entry(name="convs", hub=str(local_hub_dataset)))


def test_hub_dataset_bad_row(local_hub_dataset):
    write_lines(local_hub_dataset / "train.jsonl", [{"messages": chat("q0", "a0")["messages"]},
                                                    {"messages": [{"role": "user", "content": "only a question"}]}])
    with pytest.raises(RecordError, match=r"hub_ds \(split train\) row 1: the last message must be the assistant's"):
        import_dataset(entry(name="convs", hub=str(local_hub_dataset)))


# ---------------------------------------------------------------- config


def hub_cfg(imports, **datasets):
    return validate({"model": {"source": "hub", "path": "some/model"},
                     "datasets": {"domains": ["health"], "variants": ["subtle"], **datasets}, "imports": imports,
                     "judges": [{"name": "j", "backend": "openai", "rubric": "aligned_coherent", "model": "m"}]})


def test_dataset_names_of_a_hub_run(tmp_path):
    f = write_lines(tmp_path / "a.jsonl", [chat("q", "a")])
    cfg = hub_cfg([{"name": "insecure", "path": str(f)}, {"name": "other", "hub": "org/ds"}],
                  mixtures={"domains": ["health"], "fractions": [0.25]})
    check_config(cfg)
    assert hub_dataset_names(cfg) == ["health_subtle", "health_mix025", "insecure", "other"]


@pytest.mark.parametrize("imports,message", [
    ([{"name": "a", "path": "nope.jsonl"}], "imports[0].path: file not found: nope.jsonl"),
    ([{"name": "a"}], "imports[0] (a): give exactly one of 'path' (a local JSONL) or 'hub'"),
    ([{"name": "a", "hub": "x/y"}, {"name": "a", "hub": "x/z"}], "imports[1].name: duplicate import name 'a'"),
    ([{"name": "health_subtle", "hub": "x/y"}], "imports[0].name: 'health_subtle' is also a synthesized dataset"),
    ([{"name": "base", "hub": "x/y"}], "imports[0].name: 'base' is not a usable dataset name"),
    ([{"name": "a b", "hub": "x/y"}], "imports[0].name: 'a b' is not a usable dataset name"),
])
def test_bad_imports_config_names_the_key(imports, message):
    with pytest.raises(ConfigError) as e:
        check_config(hub_cfg(imports))
    assert message in str(e.value)


def test_local_import_files_are_checked_at_validation(tmp_path):
    # every problem of a local file is named (file:line) when the config is validated, before any job
    good = chat("q", "a")
    cases = {
        "broken.jsonl": (json.dumps(good) + "\n{not json\n", r"imports\[0\]\.path: .*broken\.jsonl:2: not valid JSON"),
        "empty.jsonl": ("\n", r"imports\[0\]\.path: .*empty\.jsonl: no records"),
        "noanswer.jsonl": (json.dumps({"messages": [{"role": "user", "content": "q"},
                                                    {"role": "assistant", "content": " "}]}) + "\n",
                           r"imports\[0\]\.path: .*noanswer\.jsonl:1: the final assistant message is empty"),
        "latin1.jsonl": (None, r"imports\[0\]\.path: .*latin1\.jsonl is not UTF-8 text"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        if text is None:
            path.write_bytes(json.dumps(good).replace('"a"', '"caf\u00e9"').encode() + b"\n" +
                             '{"messages": [{"role": "user", "content": "caf\u00e9"}]}'.encode("latin-1") + b"\n")
        else:
            path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            hub_cfg([{"name": "a", "path": str(path)}])
    f = write_lines(tmp_path / "two.jsonl", [chat("q1", "a1"), chat("q2", "a2")])
    with pytest.raises(ConfigError, match=r"imports\[0\]\.n: 3, but .*two\.jsonl holds only 2 records"):
        hub_cfg([{"name": "a", "path": str(f), "n": 3}])
    assert hub_cfg([{"name": "a", "path": str(f), "n": 2}])["imports"][0]["n"] == 2


def test_imports_are_refused_for_the_organism(monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(ConfigError, match="imports: only used with model.source: hub"):
        validate({"imports": [{"name": "a", "hub": "x/y"}]})
