"""``lora-ref tour``: the whole story in one command, written to a folder as ``report.md`` plus figures.

The sections live in :mod:`lora_ref.tour` (one module each, listed in :data:`lora_ref.tour.SECTIONS`); this
command runs them in order into a temporary folder and renames it into place when every check has passed.
"""

from __future__ import annotations

import time
from pathlib import Path

EXAMPLES = """\
examples:
  lora-ref tour                       # full tour into runs/tour/ (pretrains once, then reuses the cache)
  lora-ref tour --quick               # about a minute: shorter training everywhere, same steps
                                      # (without the real-LLM section, which needs SmolLM2)
  lora-ref tour --out runs/tour2      # another folder

The tour writes report.md, one PNG per figure and the pretrained base checkpoint (base/, Hugging Face layout) to
--out (default runs/tour). The folder must be missing, empty, or a folder an earlier tour wrote (it holds the
marker file .lora_ref_tour), which is then replaced; any other non-empty folder is refused. Nothing is written
unless every section finishes and every check passes.

The pretrained base model is cached in $LORA_REF_CACHE (default ~/.cache/lora_ref), keyed by the model config,
the corpus and the training recipe; a cold cache adds the pretraining time (about 3 minutes on 2 cores; --quick
under one minute). Progress goes to stderr; stdout gets a generated sample and a short summary."""

MARKER = ".lora_ref_tour"


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="about a minute: shorter training, same sections")
    p.add_argument("--out", default="runs/tour", help="output folder (default runs/tour)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document (report path, figures, summary, section times) instead of the summary")


def run(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from lora_ref.files.outputs import check_out_dir, output_dir

    check_out_dir(args.out, replace_marker=MARKER)  # refuse before any work
    t0 = time.perf_counter()
    with output_dir(args.out, replace_marker=MARKER) as tmp:
        from lora_ref.tour import SECTIONS
        from lora_ref.tour.context import TourContext

        ctx = TourContext(out=tmp, quick=args.quick)
        toc = []
        for i, (title, section) in enumerate(SECTIONS, 1):
            ctx.log(f"section {i}/{len(SECTIONS)}: {title}")
            ctx.text(f"## {i}. {title}")
            ts = time.perf_counter()
            section(ctx)
            toc.append((title, time.perf_counter() - ts))
        head = ["# lora_ref tour" + (" (quick)" if args.quick else ""), "",
                "LoRA, QLoRA and adapter merging from first principles in NumPy. Every number below was computed "
                "by this run (`lora-ref tour" + (" --quick" if args.quick else "") + "`); every claim in the text "
                "is checked by the tour, which stops instead of writing a report when a check fails.", "",
                "| section | seconds |", "|---|---:|"]
        head += [f"| {i}. {t} | {s:.1f} |" for i, (t, s) in enumerate(toc, 1)]
        head += [f"| total | {time.perf_counter() - t0:.1f} |", ""]
        body = "\n".join(head) + "\n" + "\n".join(ctx.markdown)
        from lora_ref.files.outputs import atomic_write

        atomic_write(tmp / "report.md", body)
    seconds = time.perf_counter() - t0
    if getattr(args, "json", False):
        import json

        print(json.dumps({"report": str(Path(args.out) / "report.md"), "quick": args.quick,
                          "figures": [f"{name}.png" for name in ctx.figures], "summary": ctx.summary,
                          "sections": [{"title": t, "seconds": sec} for t, sec in toc], "seconds": seconds}, indent=1))
        return 0
    print("\n".join(ctx.summary))
    print(f"report: {Path(args.out) / 'report.md'} ({seconds:.0f} s)")
    return 0
