"""Result files are written atomically and with the permissions the user's umask gives any new file."""

import os
import stat

import pytest

from emlab.io import read_jsonl, write_jsonl
from emlab.sae.saelens_io import save_sae
from emlab.sae.topk import TopKSAE


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_jsonl_files_follow_the_umask(tmp_path, umask):
    # grades.jsonl and every other JSONL output go through write_jsonl: a shared cluster's collaborators
    # must be able to read them as they read the rest of results/
    path = tmp_path / "grades.jsonl"
    assert write_jsonl(path, [{"a": 1}, {"a": 2}]) == 2
    assert _mode(path) == 0o666 & ~umask
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert [p.name for p in tmp_path.iterdir()] == ["grades.jsonl"]  # no temp file left


def test_sae_weights_follow_the_umask(tmp_path, umask):
    folder = save_sae(TopKSAE(4, 8, 2), tmp_path / "sae")
    for name in ("sae_weights.safetensors", "cfg.json"):
        assert _mode(folder / name) == 0o666 & ~umask, name
