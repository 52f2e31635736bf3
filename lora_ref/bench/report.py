"""Write the README's performance table from a ``lora-ref bench --json`` document.

    lora-ref bench --json > bench.json
    python -m lora_ref.bench.report bench.json README.md

The table goes between the lines ``<!-- bench:start -->`` and ``<!-- bench:end -->``: the machine, then one row
per benchmark with both times, the ratio (our time / baseline time, lower is better) and the goal. Nothing in it is
typed by hand; ``make bench-readme`` runs both steps.

    python -m lora_ref.bench.report --compare quick.json full.json

compares a ``--quick`` run with a full one row by row: the quick ratio against the full ratio, and whether they
agree within :data:`AGREE` (10 %). A row whose ratios disagree is named, and the command exits 1: the quick run
cannot stand in for the full one there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"

# the ratio goals (our time / baseline time) lora_ref holds its rows to; memory rows have none. unmerged_overhead's
# 1.15 is the top of the "unmerged adapters cost 5-15% latency" claim it checks (chapter 13)
GOALS = {"train_step": 1.0, "sgemm_1024": 1.67, "nf4_dequantize": 1.43, "nf4_gemv_4096": 0.5, "nf4_quantize": 0.1,
         "qlora_step": 1.3, "serve_mixed": 1.25, "serve_vs_sequential": 0.33, "unmerged_overhead": 1.15}
# SmolLM2 training and prefill (lora_ref.bench.real) and the contention row
GOALS.update({"real_lora_step": 0.9, "real_qlora_step": 1.3, "real_prefill": 1.0, "contention": 2.0})
# decoding SmolLM2-135M-Instruct (lora_ref.bench.decode): against transformers, and against the memory roofline
GOALS.update({"real_decode_fp32": 0.67, "real_decode_fp32_roofline": 1.43, "real_decode_nf4": 0.33,
              "real_decode_nf4_roofline": 2.0})


def _fmt_s(x) -> str:
    if not isinstance(x, (int, float)):
        return str(x)
    return f"{x * 1e3:.2f} ms" if x < 1 else f"{x:.2f} s"


def value(row: dict, key: str) -> str:
    """``row[key]`` (``ours_s`` or ``baseline_s``) with its unit: seconds as ms or s, a memory row's bytes as MiB."""
    x = row[key]
    if row["name"].startswith("memory") and isinstance(x, (int, float)):
        return f"{x / 2**20:.1f} MiB"
    return _fmt_s(x)


def text_table(results: list[dict]) -> str:
    """The rows as ``lora-ref bench`` prints them: name, our value, the baseline and its value (with units), ratio,
    goal and verdict."""
    lines = [f"{'name':<26} {'ours':>11}  {'baseline':<18} {'baseline value':>14}  {'ratio':>7}  goal"]
    for r in results:
        if r["ratio"] is None:  # the baseline could not run; the notes say why
            lines.append(f"{r['name']:<26} {value(r, 'ours_s'):>11}  {r['baseline']:<18} {'-':>14}  {'-':>7}")
            continue
        goal = "" if r.get("goal") is None else f"<= {r['goal']} {'met' if r.get('met') else 'not met'}"
        lines.append(f"{r['name']:<26} {value(r, 'ours_s'):>11}  {r['baseline']:<18} {value(r, 'baseline_s'):>14}  "
                     f"{r['ratio']:>7.3f}  {goal}")
    return "\n".join(lines)


def table(doc: dict) -> str:
    m = doc.get("machine", {})
    pools = ", ".join(f"{b.get('internal_api')} {b.get('num_threads')} threads"
                      + (f" ({b['architecture']})" if b.get("architecture") else "") for b in m.get("blas", []))
    lines = [f"Measured by `lora-ref bench --json` on {m.get('cpu', 'an unnamed CPU')}, {m.get('cpus', '?')} CPUs, "
             f"Python {m.get('python', '?')}, NumPy {m.get('numpy', '?')}"
             + (f"; thread pools: {pools}" if pools else "") + ". Ours and the baseline use the same threads.", "",
             "| row | ours | baseline | baseline time | ratio | goal | met |", "|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        name = r["name"]
        goal = GOALS.get(name)
        if r["ratio"] is None:  # the baseline could not run (the row's params say why)
            lines.append(f"| `{name}` | {value(r, 'ours_s')} | {r['baseline']} | not measured | | "
                         f"{'' if goal is None else f'<= {goal}'} | |")
            continue
        met = "" if goal is None else ("yes" if r["ratio"] <= goal else "no")
        lines.append(f"| `{name}` | {value(r, 'ours_s')} | {r['baseline']} | {value(r, 'baseline_s')} | {r['ratio']:.3f} | "
                     f"{'' if goal is None else f'<= {goal}'} | {met} |")
    return "\n".join(lines)


def update(readme: Path, doc: dict) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} ... {END} section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table(doc)}\n{END}{tail}")


AGREE = 0.10
"""Relative difference of a quick and a full ratio (|quick / full − 1|) within which the two agree."""


def compare(quick: dict, full: dict, tolerance: float = AGREE) -> tuple[list[dict], list[str]]:
    """Row-by-row agreement of a ``--quick`` document and a full one: a list of ``{name, quick, full, rel, agree}``
    (rows with a ratio on both sides, in the full run's order) and the names of rows present in only one."""
    q = {r["name"]: r for r in quick["results"]}
    f = {r["name"]: r for r in full["results"]}
    rows = []
    for name, fr in f.items():
        qr = q.get(name)
        if qr is None or fr.get("ratio") is None or qr.get("ratio") is None:
            continue
        rel = abs(qr["ratio"] / fr["ratio"] - 1)
        rows.append({"name": name, "quick": qr["ratio"], "full": fr["ratio"], "rel": rel, "agree": rel <= tolerance})
    missing = sorted(set(q) ^ set(f))
    return rows, missing


def _compare_main(quick_path: str, full_path: str) -> int:
    rows, missing = compare(json.loads(Path(quick_path).read_text()), json.loads(Path(full_path).read_text()))
    print("| row | quick | full | difference | within 10 % |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['name']}` | {r['quick']:.3f} | {r['full']:.3f} | {100 * r['rel']:.1f} % | "
              f"{'yes' if r['agree'] else 'no'} |")
    bad = [r["name"] for r in rows if not r["agree"]]
    for name in missing:
        print(f"{name}: in only one of the two runs")
    if bad:
        print(f"--quick cannot stand in for the full run for: {', '.join(bad)}")
    return 1 if bad or missing else 0


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "--compare":
        return _compare_main(argv[1], argv[2])
    if len(argv) != 2:
        sys.stderr.write("usage: python -m lora_ref.bench.report BENCH.json README.md\n"
                         "       python -m lora_ref.bench.report --compare QUICK.json FULL.json\n")
        return 2
    update(Path(argv[1]), json.loads(Path(argv[0]).read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
