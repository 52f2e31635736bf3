"""The browser pass of `make book` (book/browser_check.py) on small hand-made pages, in the real headless Chromium.

Each failure kind has a page that shows only it (a JavaScript error, an image that does not load, raw TeX left in
the text, a remote request), and a clean page shows all the things that must NOT be flagged: a loaded image, TeX
inside <code>/<pre>, math typeset asynchronously by a stand-in for MathJax (the check must wait for
``MathJax.startup.promise``), and a warning in the console. Chromium is Debian's package: when it is missing the test
installs it or fails exactly as the build does (nothing skips).
"""

from __future__ import annotations

import importlib.util
import struct
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


browser_check = _load("lora_ref_book_browser_check", ROOT / "book" / "browser_check.py")


def png(width: int, height: int) -> bytes:
    """A valid grey RGB PNG, written by hand (signature, IHDR, one zlib IDAT, IEND)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x80\x80\x80" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


# A stand-in for MathJax 3: typesets \( ... \) into <mjx-container> after 300 ms and resolves startup.promise then.
FAKE_MATHJAX = r"""<script>
window.MathJax = {startup: {promise: new Promise(done => setTimeout(() => {
  for (const el of document.querySelectorAll(".math")) {
    const box = document.createElement("mjx-container");
    box.textContent = "x²";
    el.replaceChildren(box);
  }
  done();
}, 300))}};
</script>"""

PAGES = {
    "clean.html": f"""<html><head>{FAKE_MATHJAX}</head><body>
        <h1>Clean</h1><img src="figure.png" alt="a figure">
        <p>Inline math: <span class="math">\\(x^2\\)</span>, and display math:</p>
        <div class="math">\\[x^2\\]</div>
        <pre>$$ raw TeX inside pre is code, not math $$</pre><p><code>\\(x\\)</code> in code is fine.</p>
        <script>console.warn("a warning is not an error"); console.log("$$ in the console is not the page");</script>
        </body></html>""",
    "js_error.html": """<html><body><p>Text.</p><script>undefined_function_of_the_book();</script></body></html>""",
    "console_error.html": """<html><body><p>Text.</p><script>console.error("the theme is broken");</script></body></html>""",
    "broken_image.html": """<html><body><img src="no_such_figure.png" alt="missing"></body></html>""",
    "raw_math.html": """<html><body><p>The loss is $$\\frac{1}{N}\\sum_i \\ell_i$$ per token.</p></body></html>""",
    "raw_inline_math.html": """<html><body><p>The rank \\(r\\) stays raw without MathJax.</p></body></html>""",
    "remote_image.html": """<html><body><img src="https://example.com/logo.png" alt="remote"></body></html>""",
    "remote_script.html": """<html><body><script src="http://cdn.example.com/lib.js"></script></body></html>""",
    "math_never_done.html": """<html><head><script>window.MathJax = {startup: {promise: new Promise(() => {})}};
        </script></head><body><p>Typesetting never finishes.</p></body></html>""",
}


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    site = tmp_path_factory.mktemp("site")
    (site / "figure.png").write_bytes(png(8, 6))
    chapters = site / "notebooks"
    chapters.mkdir()
    for name, text in PAGES.items():
        (site / name).write_text(text)
    (chapters / "01_first.html").write_text(PAGES["clean.html"].replace("figure.png", "../figure.png"))
    screens = site.parent / "screens"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(browser_check, "WAIT_MS", 2000)  # the stand-in typesets in 300 ms
        found = browser_check.check_pages(browser_check.pages_of(site), root=site, screens=screens)
    return {"reports": {r.page: r for r in found}, "screens": screens}


def test_pages_found_and_assets_skipped(tmp_path):
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "inner.html").write_text("<html></html>")
    (tmp_path / "notebooks").mkdir()
    for rel in ("index.html", "notebooks/02_b.html", "notebooks/01_a.html"):
        (tmp_path / rel).write_text("<html></html>")
    pages = [p.relative_to(tmp_path).as_posix() for p in browser_check.pages_of(tmp_path)]
    assert pages == ["index.html", "notebooks/01_a.html", "notebooks/02_b.html"]
    names = [browser_check.screenshot_name(tmp_path / p, tmp_path) for p in pages]
    assert names == [None, "01_a.png", "02_b.png"]


def test_clean_page_passes(reports):
    for name in ("clean.html", "notebooks/01_first.html"):
        r = reports["reports"][name]
        assert r.ok, r.lines()


def test_chapter_screenshot_kept(reports):
    shot = reports["screens"] / "01_first.png"
    assert [p.name for p in reports["screens"].iterdir()] == ["01_first.png"]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", shot.read_bytes()[16:24])
    assert (width, height) == (browser_check.VIEWPORT["width"], browser_check.VIEWPORT["height"])


def test_uncaught_exception_flagged(reports):
    r = reports["reports"]["js_error.html"]
    assert not r.ok
    assert any("undefined_function_of_the_book" in e for e in r.js_errors), r.js_errors
    assert not (r.broken_images or r.raw_math or r.remote_requests)


def test_console_error_flagged(reports):
    r = reports["reports"]["console_error.html"]
    assert r.js_errors == ["the theme is broken (console_error.html)"], r.js_errors


def test_broken_image_flagged(reports):
    r = reports["reports"]["broken_image.html"]
    assert r.broken_images == ["no_such_figure.png"]
    assert not (r.raw_math or r.remote_requests)
    assert any("no_such_figure.png" in line and "image does not load" in line for line in r.lines())


def test_raw_display_math_flagged(reports):
    r = reports["reports"]["raw_math.html"]
    assert len(r.raw_math) == 1 and "$$" in r.raw_math[0], r.raw_math
    assert not (r.js_errors or r.broken_images or r.remote_requests)


def test_raw_inline_math_flagged(reports):
    r = reports["reports"]["raw_inline_math.html"]
    assert len(r.raw_math) == 1 and "\\(r\\)" in r.raw_math[0], r.raw_math


def test_math_that_never_finishes_flagged(reports):
    r = reports["reports"]["math_never_done.html"]
    assert r.raw_math == ["MathJax error: MathJax had not finished typesetting after 2 s"], r.raw_math


def test_remote_image_flagged_and_blocked(reports):
    r = reports["reports"]["remote_image.html"]
    assert r.remote_requests == ["https://example.com/logo.png"]
    assert r.broken_images == ["https://example.com/logo.png"]  # aborted: it never loads
    assert not r.js_errors, "the aborted request is reported once, as remote, not again as a console error"


def test_remote_script_flagged(reports):
    r = reports["reports"]["remote_script.html"]
    assert r.remote_requests == ["http://cdn.example.com/lib.js"]
    assert any(line.startswith("remote_script.html: remote request: http://cdn.example.com/lib.js")
               for line in r.lines())


def test_run_exit_status(tmp_path, capsys):
    """The command-line entry: 1 and one line per problem for a bad site, 0 for a clean one."""
    bad, good = tmp_path / "bad", tmp_path / "good"
    for site, page in ((bad, PAGES["raw_math.html"]), (good, "<html><body><p>Fine.</p></body></html>")):
        site.mkdir()
        (site / "index.html").write_text(page)
    assert browser_check.run(bad, None, log=print) == 1
    out = capsys.readouterr().out
    assert "index.html: math left unrendered:" in out
    assert browser_check.run(good, tmp_path / "screens", log=print) == 0
    assert browser_check.run(tmp_path / "empty", None, log=print) == 1


def test_missing_chromium_names_apt_get(monkeypatch):
    """Without chromium and without the right to install it: one line naming `apt-get install chromium`."""
    monkeypatch.setattr(browser_check, "find_chromium", lambda: None)
    monkeypatch.setattr(browser_check.os, "geteuid", lambda: 1000)
    with pytest.raises(browser_check.ChromiumMissing) as err:
        browser_check.ensure_chromium()
    message = str(err.value)
    assert "\n" not in message and "apt-get install chromium" in message
