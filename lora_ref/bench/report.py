"""Write the README's performance table from a ``lora-ref bench --json`` document.

    lora-ref bench --json > bench.json
    python -m lora_ref.bench.report bench.json README.md

The table goes between the lines ``<!-- bench:start -->`` and ``<!-- bench:end -->``: the machine, then one row
per benchmark with both times, the ratio (our time / baseline time, lower is better) and the goal. Nothing in it is
typed by hand; ``make bench-readme`` runs both steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"

# ratio goals (our time / baseline time) of issue 8 and issue 15; memory rows have none
GOALS = {"train_step": 1.0, "sgemm_1024": 1.67, "nf4_dequantize": 1.43, "nf4_gemv_4096": 0.5, "nf4_quantize": 0.1,
         "qlora_step": 1.3, "real_lora_step": 0.9, "real_qlora_step": 1.3, "real_prefill": 1.0, "contention": 2.0}


def _fmt_s(x) -> str:
    if not isinstance(x, (int, float)):
        return str(x)
    return f"{x * 1e3:.2f} ms" if x < 1 else f"{x:.2f} s"


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
        memory = name.startswith("memory")
        fmt = (lambda b: f"{b / 2**20:.1f} MiB") if memory else _fmt_s
        goal = GOALS.get(name)
        met = "" if goal is None else ("yes" if r["ratio"] <= goal else "no")
        lines.append(f"| `{name}` | {fmt(r['ours_s'])} | {r['baseline']} | {fmt(r['baseline_s'])} | {r['ratio']:.3f} | "
                     f"{'' if goal is None else f'<= {goal}'} | {met} |")
    return "\n".join(lines)


def update(readme: Path, doc: dict) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} ... {END} section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table(doc)}\n{END}{tail}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: python -m lora_ref.bench.report BENCH.json README.md\n")
        return 2
    update(Path(argv[1]), json.loads(Path(argv[0]).read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
