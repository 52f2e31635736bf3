"""The README's performance table is written from a bench JSON document, between its markers only."""

import importlib.util
import re
from pathlib import Path

import pytest

from lora_ref.bench.report import END, START, table, text_table, update

DOC = {"machine": {"cpu": "Test CPU", "cpus": 2, "python": "3.11", "numpy": "2.4"},
       "results": [{"name": "train_step", "ours_s": 0.2, "baseline": "torch", "baseline_s": 0.25, "ratio": 0.8,
                    "params": {}},
                   {"name": "nf4_gemv_4096", "ours_s": 0.003, "baseline": "openblas_sgemv", "baseline_s": 0.005,
                    "ratio": 0.6, "params": {}},
                   {"name": "memory_lora", "ours_s": 3 * 2**20, "baseline": "memory_full", "baseline_s": 6 * 2**20,
                    "ratio": 0.5, "params": {}}]}


def test_table_rows_goals_and_verdicts():
    t = table(DOC)
    assert "Test CPU" in t
    assert "| `train_step` | 200.00 ms | torch | 250.00 ms | 0.800 | <= 1.0 | yes |" in t
    assert "| `nf4_gemv_4096` | 3.00 ms | openblas_sgemv | 5.00 ms | 0.600 | <= 0.5 | no |" in t
    assert "| `memory_lora` | 3.0 MiB | memory_full | 6.0 MiB | 0.500 |  |  |" in t


def test_printed_table_gives_each_value_its_unit():
    """The table ``lora-ref bench`` prints: times in ms (or s), a memory row's bytes in MiB (once printed as
    bytes × 1000 under an "ms" heading)."""
    rows = [dict(r, goal=g, met=m) for r, g, m in zip(DOC["results"], (1.0, 0.5, None), (True, False, None))]
    lines = text_table(rows + [{"name": "real_prefill", "ours_s": 1.5, "baseline": "torch", "baseline_s": None,
                                "ratio": None}]).splitlines()
    assert lines[1].split() == ["train_step", "200.00", "ms", "torch", "250.00", "ms", "0.800", "<=", "1.0", "met"]
    assert lines[2].split()[-4:] == ["<=", "0.5", "not", "met"]
    assert lines[3].split() == ["memory_lora", "3.0", "MiB", "memory_full", "6.0", "MiB", "0.500"]
    assert lines[4].split() == ["real_prefill", "1.50", "s", "torch", "-", "-"]


def test_update_replaces_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\nbefore\n{START}\nold table\n{END}\nafter\n")
    update(readme, DOC)
    text = readme.read_text()
    assert text.startswith("# x\nbefore\n") and text.endswith(f"{END}\nafter\n")
    assert "old table" not in text and "train_step" in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="bench:start"):
        update(readme, DOC)


def test_makefile_runs_modules_by_their_current_paths():
    """`python -m` needs a module's own path: an old path kept by lora_ref's alias finder imports, but runpy cannot
    run it (`make bench-readme` once failed that way)."""
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    modules = re.findall(r"-m (lora_ref[\w.]*)", makefile)
    assert modules, "the Makefile runs no lora_ref module with -m"
    for name in modules:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin, name
        assert Path(spec.origin).with_suffix("").as_posix().endswith(name.replace(".", "/")), (name, spec.origin)


def test_compare_quick_with_full(tmp_path, capsys):
    """--compare names the rows whose quick ratio is more than 10 % from the full one and exits 1."""
    from lora_ref.bench.report import compare, main

    quick = {"machine": {}, "results": [dict(r) for r in DOC["results"]]}
    quick["results"][0]["ratio"] = 0.8 * 1.09  # within 10 %
    quick["results"][1]["ratio"] = 0.6 * 1.12  # not
    rows, missing = compare(quick, DOC)
    assert [(r["name"], r["agree"]) for r in rows] == [("train_step", True), ("nf4_gemv_4096", False),
                                                     ("memory_lora", True)]
    assert missing == [] and abs(rows[1]["rel"] - 0.12) < 1e-12
    import json
    (tmp_path / "q.json").write_text(json.dumps(quick))
    (tmp_path / "f.json").write_text(json.dumps(DOC))
    assert main(["--compare", str(tmp_path / "q.json"), str(tmp_path / "f.json")]) == 1
    out = capsys.readouterr().out
    assert "| `nf4_gemv_4096` | 0.672 | 0.600 | 12.0 % | no |" in out
    assert "cannot stand in for the full run for: nf4_gemv_4096" in out
    quick["results"][1]["ratio"] = 0.6
    (tmp_path / "q.json").write_text(json.dumps(quick))
    assert main(["--compare", str(tmp_path / "q.json"), str(tmp_path / "f.json")]) == 0
    del quick["results"][2]
    (tmp_path / "q.json").write_text(json.dumps(quick))
    assert main(["--compare", str(tmp_path / "q.json"), str(tmp_path / "f.json")]) == 1
    assert "memory_lora: in only one of the two runs" in capsys.readouterr().out


def test_time_pair_min_settles_before_every_batch(monkeypatch):
    """``settle`` idles before each timed batch (so the other side's polling BLAS threads have gone to sleep), and
    the sleep is outside the timed interval."""
    from lora_ref.bench import quant, timing

    sleeps = []
    monkeypatch.setattr(timing.time, "sleep", lambda s: sleeps.append(s))
    calls = {"a": 0, "b": 0}

    def a():
        calls["a"] += 1

    def b():
        calls["b"] += 1

    timing.time_pair_min(a, b, rounds=3, warmup=1, min_seconds=0.0, settle=0.25)
    assert sleeps == [0.25] * 6  # 3 rounds x 2 batches
    sleeps.clear()
    timing.time_pair_min(a, b, rounds=3, warmup=1, min_seconds=0.0)
    assert sleeps == []
    assert quant._repeats(True)["settle"] == quant._repeats(False)["settle"] == quant.SETTLE >= 0.2
