"""Build the lora_ref book offline: `make book` runs this file with the project's virtualenv.

0. Make sure headless Chromium is there for step 4 (book/browser_check.py installs Debian's `chromium` when it is
   missing and we are root, else the build stops at once with one line naming `apt-get install chromium`).
1. Make sure a local MathJax 3 exists in `book/_static/mathjax/` (git-ignored). When it is missing,
   fetch the npm package once (`npm pack mathjax@<version>` in a temporary folder) and unpack its
   `es5/` folder. Nothing is loaded from a CDN, at build time or when the book is read.
2. Run Sphinx (myst-nb, sphinx-book-theme) with warnings as errors (`-W --keep-going`, so one build
   lists every problem), from a fresh environment (`-E`), executing every notebook in `notebooks/`
   (see `conf.py`). The HTML goes to `book/_build/html/`. The notebook kernels start with the book's figure rule
   installed (book/_ext/figure_rule.py: every figure has a title, every visible axes labelled x and y axes; a
   figure that breaks it fails its cell), and with `$LORA_REF_PROGRESS_LOG` set, so a cached run that trains
   reports its progress here, on the console (lora_ref/files/progress.py). With `QUICK=1` (`$LORA_REF_QUICK`) the
   chapters take their small configurations (lora_ref/quick.py). The seconds each notebook took are printed at
   the end (from myst-nb's execution data).
3. Scan the built HTML, CSS and JS for remote assets (a `src=`, `<link href=`, `@import` or `url(`
   that points at `http(s)://` or `//`), the pages for Markdown tables printed as text (a cell output
   not parsed as MyST), and the chapters for cells tagged `raises-exception` that ran without an error (an
   exercise's self-check must fail on the empty answer), and fail listing them.
4. Open every built page from disk (`file://`) in headless Chromium (book/browser_check.py) and fail on a
   JavaScript error, an image that does not load, math left unrendered or any remote request; keep one PNG
   screenshot per chapter in `book/_build/screens/`.

Exit status 0 means the book is built, every notebook ran without error, nothing is remote and every page works in
a real browser.

Usage: python book/build.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

BOOK = Path(__file__).resolve().parent
ROOT = BOOK.parent
for _path in (BOOK, BOOK / "_ext"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import browser_check  # noqa: E402  (book/browser_check.py)
import figure_rule  # noqa: E402  (book/_ext/figure_rule.py)

STATIC = BOOK / "_static"
MATHJAX_DIR = STATIC / "mathjax"
MATHJAX_VERSION = "3.2.2"  # keep in step with conf.py
MATHJAX_ENTRY = "tex-mml-chtml.js"
VERSION_FILE = ".lora_ref-mathjax-version"

REMOTE = r"""["']?\s*(?:https?:)?//"""
HTML_PATTERNS = [
    re.compile(r"<(?:script|img|iframe|audio|video|source|embed|track|input)\b[^>]*?\b(?:src|srcset)\s*=\s*" + REMOTE, re.I),
    re.compile(r"<link\b[^>]*?\bhref\s*=\s*" + REMOTE, re.I),
]
CSS_PATTERNS = [
    re.compile(r"@import\s*(?:url\(\s*)?" + REMOTE, re.I),
    re.compile(r"\burl\(\s*" + REMOTE, re.I),
]


def log(message: str) -> None:
    print(f"[book] {message}", flush=True)


def ensure_mathjax() -> float:
    """Unpack MathJax's `es5/` into `book/_static/mathjax/` unless that version is there; seconds spent."""
    marker = MATHJAX_DIR / VERSION_FILE
    if (MATHJAX_DIR / MATHJAX_ENTRY).is_file() and marker.is_file():
        if marker.read_text().strip() == MATHJAX_VERSION:
            log(f"MathJax {MATHJAX_VERSION}: local copy in {MATHJAX_DIR.relative_to(ROOT)}")
            return 0.0
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit(
            "[book] error: npm not found. The book needs a local MathJax 3, fetched once with npm "
            f"(npm pack mathjax@{MATHJAX_VERSION}); install node/npm and run `make book` again."
        )
    start = time.perf_counter()
    log(f"fetching MathJax {MATHJAX_VERSION} with npm (once; kept in {MATHJAX_DIR.relative_to(ROOT)})")
    STATIC.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mathjax-", dir=STATIC) as tmp:
        tmp_path = Path(tmp)
        for attempt in range(3):  # a registry hiccup should not fail a CI run
            proc = subprocess.run(
                [npm, "pack", f"mathjax@{MATHJAX_VERSION}", "--json", "--silent"],
                cwd=tmp_path,
                capture_output=True,
                text=True,
            )
            if proc.returncode == 0:
                break
            log(f"npm pack failed (attempt {attempt + 1} of 3): {proc.stderr.strip()[-300:]}")
            time.sleep(5)
        if proc.returncode != 0:
            raise SystemExit(
                f"[book] error: `npm pack mathjax@{MATHJAX_VERSION}` failed (exit {proc.returncode}):\n"
                f"{proc.stderr.strip()}"
            )
        tarball = tmp_path / json.loads(proc.stdout)[0]["filename"]
        unpacked = tmp_path / "mathjax"
        prefix = "package/es5/"
        with tarfile.open(tarball) as tar:
            members = []
            for member in tar.getmembers():
                if member.name.startswith(prefix) and (member.isfile() or member.isdir()):
                    member.name = member.name[len(prefix):]
                    if member.name:
                        members.append(member)
            tar.extractall(unpacked, members=members, filter="data")
            license_member = tar.getmember("package/LICENSE")
            license_member.name = "LICENSE"
            tar.extractall(unpacked, members=[license_member], filter="data")
        if not (unpacked / MATHJAX_ENTRY).is_file():
            raise SystemExit(f"[book] error: the MathJax package has no es5/{MATHJAX_ENTRY}")
        (unpacked / VERSION_FILE).write_text(MATHJAX_VERSION + "\n")
        if MATHJAX_DIR.exists():
            shutil.rmtree(MATHJAX_DIR)
        unpacked.rename(MATHJAX_DIR)
    return time.perf_counter() - start


class ProgressTail:
    """Print the lines that cached runs append to the progress log while the notebooks execute (a thread)."""

    def __init__(self, path: Path, prefix: str = "[book]   ", emit=None):
        self.path, self.prefix = path, prefix
        self.emit = emit or (lambda line: print(line, flush=True))
        self._stop = threading.Event()
        self._offset = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _print_new(self) -> None:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                f.seek(self._offset)
                text = f.read()
        except FileNotFoundError:
            return
        complete = text[: text.rfind("\n") + 1]  # a line still being written waits for the next look
        self._offset += len(complete.encode("utf-8"))
        for line in complete.splitlines():
            self.emit(self.prefix + line)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._print_new()

    def __enter__(self) -> "ProgressTail":
        self._thread.start()
        return self

    def __exit__(self, *_exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self._print_new()


def run_sphinx(out: Path) -> tuple[int, float]:
    """Run sphinx-build with warnings as errors; return (exit code, seconds)."""
    doctrees = out.parent / "doctrees"
    shutil.rmtree(out / "reports", ignore_errors=True)
    (doctrees / "execution.json").unlink(missing_ok=True)
    env = dict(os.environ)
    # The kernel that runs the notebooks must be this interpreter (the project's .venv).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # figures render inline
    cmd = [
        sys.executable, "-m", "sphinx",
        "-b", "html",
        "-E",  # fresh environment: every notebook is executed again
        "-W", "--keep-going",
        "-d", str(doctrees),
        str(BOOK), str(out),
    ]
    log("running " + " ".join(cmd[1:]))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lora_ref-book-") as tmp:
        # Every notebook kernel starts with the figure rule (an IPython startup file in its own IPYTHONDIR) and
        # appends the progress of the cached runs it trains to a log that this process prints as it grows.
        figure_rule.write_ipython_dir(Path(tmp) / "ipython", BOOK / "_ext")
        env["IPYTHONDIR"] = str(Path(tmp) / "ipython")
        env["LORA_REF_PROGRESS_LOG"] = str(Path(tmp) / "progress.log")
        with ProgressTail(Path(tmp) / "progress.log"):
            code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    return code, time.perf_counter() - start


def quick_mode() -> bool:
    """Whether the chapters run their small configurations (``QUICK=1``, i.e. ``$LORA_REF_QUICK``)."""
    from lora_ref.quick import quick

    return quick()


def report_execution_times(out: Path) -> float:
    """Print each notebook's execution time (myst-nb's record, written by book/_ext); return their sum."""
    path = out.parent / "doctrees" / "execution.json"
    if not path.is_file():
        log("no execution times recorded (the build stopped before writing them)")
        return 0.0
    times = json.loads(path.read_text())
    total = sum(t["seconds"] or 0.0 for t in times.values())
    mode = "QUICK" if quick_mode() else "full"
    log(f"notebook execution times ({mode} configuration), {total:.0f} s in all:")
    for docname, t in times.items():
        seconds = "?" if t["seconds"] is None else f"{t['seconds']:7.1f} s"
        print(f"    {seconds}  {docname}{'' if t['succeeded'] else '  FAILED'}", flush=True)
    return total


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def report_failed_notebooks(out: Path) -> list[str]:
    """Print the failing cell and traceback from each log myst-nb left in `reports/`; return the names."""
    failed = []
    for report in sorted((out / "reports").glob("**/*.err.log")):
        name = report.name.removesuffix(".err.log")
        failed.append(name)
        text = ANSI.sub("", report.read_text(errors="replace"))
        marker = "An error occurred while executing the following cell:"
        text = text[text.index(marker):] if marker in text else "\n".join(text.splitlines()[-30:])
        print(f"\n[book] notebook {name} failed; full log: {report.relative_to(ROOT)}", flush=True)
        for line in text.rstrip().splitlines():
            print(f"    {line}")
    return failed


def scan_remote_assets(out: Path, root: Path = ROOT) -> list[str]:
    """Every remote asset reference in the built site, as 'file:line: text' (file relative to root)."""
    found = []
    for path in sorted(out.rglob("*")):
        suffix = path.suffix.lower()
        if suffix not in {".html", ".htm", ".css", ".js", ".mjs"} or not path.is_file():
            continue
        patterns = CSS_PATTERNS + (HTML_PATTERNS if suffix in {".html", ".htm"} else [])
        text = path.read_text(errors="replace")
        for pattern in patterns:
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                snippet = text[match.start(): match.end() + 60].split("\n")[0]
                found.append(f"{path.relative_to(root)}:{line}: {snippet}")
    return found


# A Markdown table that reached the page as text: a paragraph whose first line is a row ("| a | b |") and which
# holds a separator row (pipes with dashes, which smart quotes may have turned into en or em dashes).
UNRENDERED_TABLE = re.compile(r"<p>\|[^\n<]*\|\s*\n\s*\|\s*[-\u2013\u2014:]+\s*\|", re.S)


def scan_unrendered_tables(out: Path, root: Path = ROOT) -> list[str]:
    """Every Markdown table printed as a paragraph instead of a <table> in the built pages, as 'file:line: text'."""
    found = []
    for path in sorted(out.rglob("*.html")):
        text = path.read_text(errors="replace")
        for match in UNRENDERED_TABLE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append(f"{path.relative_to(root)}:{line}: {text[match.start(): match.start() + 60].splitlines()[0]}")
    return found


# A code cell of a built page, up to the next cell: myst-nb writes its tags as classes ("tag_raises-exception").
CELL_START = re.compile(r'<div class="cell(?: [^"]*)?"')
TRACEBACK = 'class="output traceback'


def scan_unfailed_self_checks(out: Path, root: Path = ROOT) -> list[str]:
    """Chapter cells tagged ``raises-exception`` that ran without an error, as 'file: cell k'.

    In a chapter that tag marks an exercise's self-check, which must fail while the answer cell is empty (the
    solutions notebooks run the same check untagged, where the build requires it to pass). A tagged cell that ran
    clean means the self-check does not check anything.
    """
    found = []
    for path in sorted((out / "notebooks").glob("[0-9][0-9]_*.html")):
        text = path.read_text(errors="replace")
        starts = [m.start() for m in CELL_START.finditer(text)] + [len(text)]
        for k, (a, b) in enumerate(zip(starts, starts[1:])):
            cell = text[a:b]
            head = cell[: cell.index(">")]
            if "tag_raises-exception" in head and TRACEBACK not in cell:
                found.append(f"{path.relative_to(root)}: code cell {k + 1} is tagged raises-exception but ran "
                             "without an error")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BOOK / "_build" / "html", help="HTML output folder")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    total = time.perf_counter()

    chapters = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if not chapters:
        log("error: notebooks/ holds no chapter (NN_name.ipynb); nothing to build")
        return 1
    log(f"{len(chapters)} chapters: " + ", ".join(p.stem for p in chapters))
    log("QUICK mode: every chapter's small configuration (LORA_REF_QUICK)" if quick_mode()
        else "full configuration (QUICK=1 builds the chapters' small configurations)")
    try:
        chromium = browser_check.ensure_chromium(log)
    except browser_check.ChromiumMissing as err:
        log(f"error: {err}")
        return 1

    mathjax_seconds = ensure_mathjax()
    code, sphinx_seconds = run_sphinx(out)
    report_execution_times(out)
    failed = report_failed_notebooks(out)
    if code != 0:
        if failed:
            log(f"error: {len(failed)} notebook(s) failed to execute: {', '.join(failed)}")
        log(f"error: sphinx-build exited with {code} (warnings are errors; see the messages above)")
        return 1

    start = time.perf_counter()
    remote = scan_remote_assets(out)
    tables = scan_unrendered_tables(out)
    unfailed = scan_unfailed_self_checks(out)
    scan_seconds = time.perf_counter() - start
    if remote:
        log(f"error: the built book loads {len(remote)} remote asset(s):")
        for item in remote:
            print(f"    {item}")
    if tables:
        log(f"error: {len(tables)} Markdown table(s) reached the pages as text, not as tables:")
        for item in tables:
            print(f"    {item}")
    if unfailed:
        log(f"error: {len(unfailed)} exercise self-check(s) pass on the empty answer (they must fail until the "
            "learner answers):")
        for item in unfailed:
            print(f"    {item}")
    if remote or tables or unfailed:
        return 1

    start = time.perf_counter()
    screens = out.parent / "screens"
    shutil.rmtree(screens, ignore_errors=True)
    pages = browser_check.pages_of(out)
    log(f"browser pass: opening {len(pages)} pages from disk in headless Chromium ({chromium})")
    if browser_check.run(out, screens, log=log) != 0:
        return 1
    browser_seconds = time.perf_counter() - start

    log(
        f"built {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} in "
        f"{time.perf_counter() - total:.0f} s (MathJax fetch {mathjax_seconds:.0f} s, "
        f"sphinx with notebook execution {sphinx_seconds:.0f} s, scans {scan_seconds:.1f} s, "
        f"browser pass {browser_seconds:.0f} s); no remote assets, every table rendered, every page clean in Chromium"
    )
    log(f"open {out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
