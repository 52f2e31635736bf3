"""The artifact cache: keys follow the description, builds are atomic, a failed build leaves nothing."""

import json

import pytest

from lora_ref.files import cache


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_REF_CACHE", str(tmp_path / "c"))


def test_root_from_environment(tmp_path, monkeypatch):
    assert cache.cache_root() == tmp_path / "c"
    monkeypatch.delenv("LORA_REF_CACHE")
    assert cache.cache_root().parts[-2:] == (".cache", "lora_ref")


def test_key_is_canonical_and_changes_with_the_description():
    a = {"config": {"d": 128, "L": 4}, "seed": 0}
    assert cache.cache_key(a) == cache.cache_key({"seed": 0, "config": {"L": 4, "d": 128}})  # key order is irrelevant
    assert cache.cache_key(a) != cache.cache_key({"config": {"d": 128, "L": 4}, "seed": 1})
    assert cache.cache_key(a) != cache.cache_key({"config": {"d": 128, "L": 4.5}, "seed": 0})
    with pytest.raises(ValueError, match="plain JSON"):
        cache.cache_key({"x": float("nan")})
    with pytest.raises(ValueError, match="plain JSON"):
        cache.cache_key({"x": object()})


def test_build_once_then_reuse(tmp_path):
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "weights.json").write_text("[1, 2]")

    desc = {"what": "test", "n": 1}
    assert cache.lookup("thing", desc) is None
    path = cache.get_or_build("thing", desc, build)
    assert path == tmp_path / "c" / "thing" / cache.cache_key(desc)
    assert sorted(p.name for p in path.iterdir()) == ["key.json", "weights.json"]
    assert json.loads((path / "key.json").read_text()) == desc
    assert cache.get_or_build("thing", desc, build) == path and len(calls) == 1  # reused, not rebuilt
    assert cache.lookup("thing", desc) == path
    other = cache.get_or_build("thing", {"what": "test", "n": 2}, build)
    assert other != path and len(calls) == 2


def test_failed_build_leaves_nothing(tmp_path):
    def build(folder):
        (folder / "half.json").write_text("{")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        cache.get_or_build("thing", {"n": 1}, build)
    assert list((tmp_path / "c" / "thing").iterdir()) == []
    assert cache.lookup("thing", {"n": 1}) is None


def test_unfinished_folder_is_replaced(tmp_path):
    desc = {"n": 1}
    stale = cache.artifact_dir("thing", desc)
    stale.mkdir(parents=True)
    (stale / "partial.bin").write_bytes(b"\0")  # no key.json: not a finished artifact
    assert cache.lookup("thing", desc) is None
    path = cache.get_or_build("thing", desc, lambda f: (f / "ok.json").write_text("1"))
    assert sorted(p.name for p in path.iterdir()) == ["key.json", "ok.json"]
    assert [p.name for p in (tmp_path / "c" / "thing").iterdir()] == [path.name]


def test_abandoned_temporary_folders_are_removed(tmp_path):
    import os

    desc = {"n": 3}
    final = cache.artifact_dir("thing", desc)
    final.parent.mkdir(parents=True)
    old = final.parent / f".{final.name}.tmp-killed"
    recent = final.parent / f".{final.name}.tmp-running"
    old.mkdir()
    recent.mkdir()
    day_ago = old.stat().st_mtime - cache.ABANDONED_AFTER_S - 10
    os.utime(old, (day_ago, day_ago))
    cache.get_or_build("thing", desc, lambda f: None)
    assert not old.exists() and recent.exists()  # a concurrent build's folder is left alone


def test_bad_kind():
    with pytest.raises(ValueError, match="kind"):
        cache.artifact_dir("../escape", {})
