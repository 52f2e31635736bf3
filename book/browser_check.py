"""Open every page of the built book in headless Chromium, from disk, and fail on what a reader would see broken.

`make book` runs this after Sphinx (book/build.py); it also runs on its own against an existing build::

    python book/browser_check.py [--html book/_build/html] [--screens book/_build/screens]

Each page is opened as a ``file://`` URL, exactly as a reader opens ``book/_build/html/index.html``, and fails on:

- **a JavaScript error**: a console message of level ``error`` (this includes a script, stylesheet or font of the
  book that the browser cannot load) or an uncaught exception;
- **an image that does not load**: an ``<img>`` whose ``naturalWidth`` is 0 once it has finished loading;
- **math left unrendered**: after MathJax's initial typesetting (``MathJax.startup.promise``), raw TeX delimiters
  ``$$``, ``\\(``, ``\\)``, ``\\[`` or ``\\]`` in the page's text outside ``<pre>``, ``<code>`` and scripts, or a
  MathJax error box (TeX that failed to parse);
- **a remote request**: any request, WebSocket included, whose URL is not ``file:``, ``data:``, ``blob:`` or
  ``about:``. Remote requests are aborted before they leave the machine, so the check also holds offline.

It keeps one PNG screenshot of the top of every chapter page (``notebooks/NN_name.html``) in the screens folder.

Chromium is Debian's ``chromium`` package, driven through Playwright's Python API with ``executable_path`` set
to it (Playwright's own browser download is never used). When ``chromium`` is missing and we run as root,
:func:`ensure_chromium` installs it with ``apt-get install -y chromium``; otherwise, or when that fails, it stops
with one line that names ``apt-get install chromium``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BOOK = Path(__file__).resolve().parent
ROOT = BOOK.parent
CHROMIUM_NAMES = ("chromium", "chromium-browser")
INSTALL_HINT = "apt-get install chromium"
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")
REMOTE_URL = re.compile(r"^(?!file:|data:|blob:|about:)[a-z][a-z0-9+.-]*:", re.I)
# Built folders that hold assets, not pages (MathJax's own folder, the copied sources, myst-nb's logs).
NOT_PAGES = {"_static", "_sources", "_images", "reports", "_downloads"}
VIEWPORT = {"width": 1280, "height": 900}
PAGE_TIMEOUT_MS = 60_000  # loading a page
WAIT_MS = 30_000  # MathJax's typesetting, then the images, after the page loaded

# Runs in the page after it loaded: wait for MathJax (when the page has it) and for every image, then report the
# images that failed, the raw TeX left in the text and MathJax's error boxes.
INSPECT_JS = r"""
async (waitMs) => {
  const late = () => new Promise(done => setTimeout(() => done("late"), waitMs));
  let mathLate = false;
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    mathLate = (await Promise.race([MathJax.startup.promise.then(() => "done"), late()])) === "late";
  }
  const images = Array.from(document.images);
  for (const img of images) { img.loading = "eager"; }  // a lazy image below the fold would never load
  await Promise.race([late(), Promise.all(images.map(img => img.complete ? null :
    new Promise(done => { img.addEventListener("load", done); img.addEventListener("error", done); })))]);
  const broken = images.filter(img => img.naturalWidth === 0).map(img => img.getAttribute("src") || "(no src)");

  const skip = new Set(["PRE", "CODE", "SCRIPT", "STYLE", "TEXTAREA", "NOSCRIPT", "MJX-CONTAINER", "SAMP", "KBD"]);
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {
    acceptNode(node) {
      for (let el = node.parentElement; el; el = el.parentElement) {
        if (skip.has(el.tagName)) return NodeFilter.FILTER_REJECT;
      }
      return NodeFilter.FILTER_ACCEPT;
    }
  });
  const raw = [];
  const delimiters = /\$\$|\\\(|\\\)|\\\[|\\\]/;
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const text = node.nodeValue;
    const m = text.match(delimiters);
    if (m) {
      const at = Math.max(0, m.index - 30);
      raw.push(text.slice(at, m.index + 50).replace(/\s+/g, " ").trim());
    }
  }
  const mathErrors = Array.from(document.querySelectorAll("mjx-merror"))
    .map(el => (el.getAttribute("data-mjx-error") || el.textContent || "").slice(0, 80));
  if (mathLate) mathErrors.push(`MathJax had not finished typesetting after ${waitMs / 1000} s`);
  return {broken, raw, mathErrors};
}
"""


@dataclass
class PageReport:
    """What went wrong on one page (empty lists: the page is fine)."""

    page: str
    js_errors: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    raw_math: list[str] = field(default_factory=list)
    remote_requests: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.js_errors or self.broken_images or self.raw_math or self.remote_requests)

    def lines(self) -> list[str]:
        """One line per problem, each naming its kind."""
        out = [f"{self.page}: JavaScript error: {e}" for e in self.js_errors]
        out += [f"{self.page}: image does not load: {s}" for s in self.broken_images]
        out += [f"{self.page}: math left unrendered: {t}" for t in self.raw_math]
        out += [f"{self.page}: remote request: {u}" for u in self.remote_requests]
        return out


class ChromiumMissing(RuntimeError):
    """Chromium is not installed and could not be installed here."""


def find_chromium() -> str | None:
    """Path of the system Chromium, or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def ensure_chromium(log=print) -> str:
    """The system Chromium's path, installing Debian's ``chromium`` package first when missing and we are root.

    Raises :class:`ChromiumMissing` (its message is one line naming ``apt-get install chromium``) when it is
    missing and cannot be installed.
    """
    found = find_chromium()
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        why = "no apt-get" if apt is None else "not root"
        raise ChromiumMissing(f"headless Chromium is needed to check the book's pages ({why} to install it): "
                              f"run `{INSTALL_HINT}`")
    log(f"chromium not found; installing Debian's package ({INSTALL_HINT} -y)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [apt, "install", "-y", "-q", "chromium"]
    proc = subprocess.run(install, env=env, capture_output=True, text=True)
    if proc.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run([apt, "update", "-q"], env=env, capture_output=True, text=True)
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
    found = find_chromium()
    if proc.returncode != 0 or found is None:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ChromiumMissing(f"headless Chromium is needed to check the book's pages and `{INSTALL_HINT}` "
                              f"failed ({last})")
    return found


def pages_of(html: Path) -> list[Path]:
    """Every built HTML page below ``html``, asset folders left out, in a stable order."""
    return sorted(p for p in html.rglob("*.html")
                  if not NOT_PAGES.intersection(p.relative_to(html).parts[:-1]))


def screenshot_name(page: Path, html: Path) -> str | None:
    """``NN_name.png`` for a chapter page ``notebooks/NN_name.html``, else None."""
    rel = page.relative_to(html)
    if len(rel.parts) == 2 and rel.parts[0] == "notebooks" and rel.name[:2].isdigit() and rel.name[2] == "_":
        return rel.stem + ".png"
    return None


def check_pages(pages: list[Path], *, root: Path, screens: Path | None = None, chromium: str | None = None,
                progress=None) -> list[PageReport]:
    """Open each page in headless Chromium; return one :class:`PageReport` per page.

    ``root`` is the folder page names are reported relative to; chapter screenshots go to ``screens`` (None: no
    screenshots); ``progress(i, n, name)`` is called before each page.
    """
    from playwright.sync_api import sync_playwright

    chromium = chromium or ensure_chromium()
    if screens is not None:
        screens.mkdir(parents=True, exist_ok=True)
    reports = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            context = browser.new_context(viewport=VIEWPORT, service_workers="block")
            for i, path in enumerate(pages):
                name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
                if progress is not None:
                    progress(i, len(pages), name)
                reports.append(_check_one(context, path, name, screens, root))
            context.close()
        finally:
            browser.close()
    return reports


def _is_local(url: str) -> bool:
    return url.startswith(LOCAL_SCHEMES)


def _check_one(context, path: Path, name: str, screens: Path | None, root: Path) -> PageReport:
    report = PageReport(name)
    page = context.new_page()

    def on_request(request):
        if not _is_local(request.url):
            report.remote_requests.append(request.url)

    def on_console(msg):
        if msg.type != "error":
            return
        where = (msg.location or {}).get("url", "")
        if where and not _is_local(where):
            return  # the aborted remote request itself, already reported
        if msg.text.startswith("Failed to load resource") and report.remote_requests and not where:
            return
        report.js_errors.append(msg.text + (f" ({_short(where, root)})" if where else ""))

    page.on("request", on_request)
    page.on("websocket", lambda ws: report.remote_requests.append(ws.url))
    page.on("console", on_console)
    page.on("pageerror", lambda err: report.js_errors.append(f"uncaught {err.name}: {err.message}"))
    page.on("requestfailed", lambda req: report.js_errors.append(
        f"cannot load {_short(req.url, root)}: {req.failure}") if _is_local(req.url) else None)
    page.route(REMOTE_URL, lambda route: route.abort())  # recorded by on_request; never leaves the machine
    try:
        page.goto(path.resolve().as_uri(), wait_until="load", timeout=PAGE_TIMEOUT_MS)
        found = page.evaluate(INSPECT_JS, WAIT_MS)
        report.broken_images += found["broken"]
        report.raw_math += found["raw"] + [f"MathJax error: {e}" for e in found["mathErrors"]]
        shot = screenshot_name(path, root) if screens is not None else None
        if shot:
            page.screenshot(path=str(screens / shot))
    except Exception as err:  # a page that never loads, or a script that hangs MathJax
        report.js_errors.append(f"{type(err).__name__}: {str(err).splitlines()[0]}")
    finally:
        page.close()
    return report


def _short(url: str, root: Path) -> str:
    prefix = root.resolve().as_uri() + "/"
    return url[len(prefix):] if url.startswith(prefix) else url


def run(html: Path, screens: Path | None, log=print) -> int:
    """Check every page below ``html``; print the problems; 0 when every page is clean, else 1."""
    html = html.resolve()
    pages = pages_of(html)
    if not pages:
        log(f"error: no built page in {html}; build the book first (make book)")
        return 1
    try:
        chromium = ensure_chromium(log)
    except ChromiumMissing as err:
        log(f"error: {err}")
        return 1
    start = time.perf_counter()
    reports = check_pages(pages, root=html, screens=screens, chromium=chromium)
    seconds = time.perf_counter() - start
    bad = [r for r in reports if not r.ok]
    shots = sorted(screens.glob("*.png")) if screens is not None else []
    if bad:
        log(f"error: {len(bad)} of {len(pages)} page(s) fail in headless Chromium:")
        for r in bad:
            for line in r.lines():
                print(f"    {line}", flush=True)
        return 1
    log(f"browser pass: {len(pages)} pages opened from disk in headless Chromium in {seconds:.0f} s: no JavaScript "
        f"error, every image loads, all math rendered, no remote request; {len(shots)} chapter screenshots in "
        f"{screens}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--html", type=Path, default=BOOK / "_build" / "html", help="the built book")
    parser.add_argument("--screens", type=Path, default=BOOK / "_build" / "screens", help="chapter screenshots")
    args = parser.parse_args(argv)
    return run(args.html, args.screens, log=lambda m: print(f"[book] {m}", flush=True))


if __name__ == "__main__":
    sys.exit(main())
