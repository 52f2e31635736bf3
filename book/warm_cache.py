"""Build every cached run the chapters use, with a progress bar: `make warm-cache` (`make warm-cache QUICK=1`).

The chapters read their long runs (the pretrained tutorial base, the fine-tunes of chapters 7 and 9-11, the real
model's runs of chapter 12, ...) from the artifact cache (lora_ref.files.cache, ``~/.cache/lora_ref`` or
``$LORA_REF_CACHE``) and train them when they are missing. Which runs a chapter needs is written in the chapter
itself, so this script does not keep a second list that could drift from it: it executes every chapter notebook,
top to bottom, as the book build does, and every run a chapter asks for is then in the cache. With ``QUICK=1``
(``$LORA_REF_QUICK``) the chapters ask for their small configurations, which are cached under their own keys.

On the console: one bar over all the chapters' code cells (the chapter being run in its label), and above it the
progress lines the cached runs write while they train (``$LORA_REF_PROGRESS_LOG``, lora_ref/files/progress.py): when
a run starts, every few seconds while it trains, when it is stored. At the end, a table of each chapter's time.
A chapter that fails is reported (its failing cell and error) and the others still run; the exit status is then 1.
Cells tagged ``raises-exception`` (the exercises' self-checks) may fail, as in the book.

Usage: python book/warm_cache.py [--notebooks DIR] [CHAPTER ...]   (CHAPTER: a file name or its NN prefix)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

BOOK = Path(__file__).resolve().parent
ROOT = BOOK.parent
if str(BOOK) not in sys.path:
    sys.path.insert(0, str(BOOK))

from build import ProgressTail  # noqa: E402  (book/build.py)

CELL_TIMEOUT = int(os.environ.get("LORA_REF_BOOK_CELL_TIMEOUT", "3600"))


def log(message: str) -> None:
    print(f"[warm-cache] {message}", flush=True)


def chapters_in(folder: Path, wanted: list[str] | None = None) -> list[Path]:
    """The chapter notebooks ``NN_name.ipynb`` of ``folder`` (all, or those named or numbered in ``wanted``)."""
    found = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not wanted:
        return found
    chosen = [p for p in found if p.name in wanted or p.stem in wanted or p.name[:2] in wanted]
    unknown = [w for w in wanted if not any(w in (p.name, p.stem, p.name[:2]) for p in found)]
    if unknown:
        raise ValueError(f"no chapter {', '.join(unknown)} in {folder}")
    return chosen


def _first_error(cell) -> str:
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            return f"{out.get('ename')}: {out.get('evalue')}"
    return "error"


def run_chapters(paths: list[Path], *, timeout: int = CELL_TIMEOUT, bar_file=None) -> list[dict]:
    """Execute each notebook (kernel cwd: its folder; nothing is written back); one result dict per notebook.

    A result is ``{"name", "seconds", "ok", "error"}`` (``error``: the failing cell's number and error, or None).
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from tqdm import tqdm

    books = [(p, nbformat.read(p, as_version=4)) for p in paths]
    total = sum(1 for _, nb in books for c in nb.cells if c.cell_type == "code")
    results = []
    bar = tqdm(total=total, unit="cell", file=bar_file or sys.stderr, dynamic_ncols=True)
    try:
        for path, nb in books:
            bar.set_description(path.stem)
            client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=False,
                                    resources={"metadata": {"path": str(path.parent)}})
            start = time.perf_counter()
            error = None
            with client.setup_kernel():
                for index, cell in enumerate(nb.cells):
                    if cell.cell_type != "code":
                        continue
                    try:
                        client.execute_cell(cell, index)
                    except CellExecutionError:
                        first = next((l for l in cell.source.splitlines() if l.strip()), "")[:60]
                        error = f"cell {index} ({first!r}): {_first_error(cell)}"
                        break
                    finally:
                        bar.update(1)
            if error:  # the cells after the failure did not run: move the bar past them
                done = sum(1 for c in nb.cells[: index + 1] if c.cell_type == "code")
                bar.update(sum(1 for c in nb.cells if c.cell_type == "code") - done)
            seconds = time.perf_counter() - start
            results.append({"name": path.name, "seconds": seconds, "ok": error is None, "error": error})
            bar.write(f"[warm-cache] {path.stem}: {'done' if error is None else 'FAILED'} in {seconds:.0f} s"
                      + (f" ({error})" if error else ""))
    finally:
        bar.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notebooks", type=Path, default=ROOT / "notebooks", help="folder of chapter notebooks")
    parser.add_argument("chapters", nargs="*", help="only these chapters (file name, stem or NN)")
    args = parser.parse_args(argv)
    try:
        paths = chapters_in(args.notebooks, args.chapters)
    except ValueError as err:
        log(f"error: {err}")
        return 2
    if not paths:
        log(f"error: no chapter notebook (NN_name.ipynb) in {args.notebooks}")
        return 1
    from lora_ref.files.cache import cache_root
    from lora_ref.quick import quick

    mode = "QUICK (small) configuration" if quick() else "full configuration (QUICK=1: the small one)"
    log(f"{len(paths)} chapters, {mode}; cache: {cache_root()}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lora_ref-warm-") as tmp:
        progress_log = Path(tmp) / "progress.log"
        saved = os.environ.get("LORA_REF_PROGRESS_LOG")
        os.environ["LORA_REF_PROGRESS_LOG"] = str(progress_log)  # the kernels inherit it
        from tqdm import tqdm

        try:
            with ProgressTail(progress_log, prefix="[warm-cache]   ", emit=tqdm.write):  # lines above the bar
                results = run_chapters(paths)
        finally:
            if saved is None:
                os.environ.pop("LORA_REF_PROGRESS_LOG", None)
            else:
                os.environ["LORA_REF_PROGRESS_LOG"] = saved
    failed = [r for r in results if not r["ok"]]
    log(f"{len(results) - len(failed)} of {len(results)} chapters ran in {time.perf_counter() - start:.0f} s:")
    for r in results:
        print(f"    {r['seconds']:7.1f} s  {r['name']}" + ("" if r["ok"] else f"  FAILED: {r['error']}"), flush=True)
    if failed:
        log(f"error: {len(failed)} chapter(s) failed; the runs they reached before the failure are cached")
        return 1
    log(f"every cached run the chapters use is in {cache_root()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
