"""Sphinx configuration for the lora_ref book (built offline by `book/build.py`).

The chapters are the notebooks in `notebooks/`, executed at every build (myst-nb, execution mode
"force"). Sphinx only reads documents below its source folder, so `book/notebooks` is a symlink to
`../notebooks`, created here when missing (git ignores it): notebooks run in place, with
`notebooks/` as their working directory, exactly as they do in JupyterLab.

Nothing here may load from the network when the book is viewed: MathJax comes from the local copy
that `build.py` unpacks into `_static/mathjax/`, the theme gets no launch, analytics, repository or
version-switcher options, and widget outputs never pull their CDN scripts. `build.py` scans the
built HTML, CSS and JS and fails on any remote asset, then opens every page in headless Chromium
(`browser_check.py`).

Figures: every matplotlib figure a chapter draws has a title (a suptitle or an axes title) and every visible axes
labelled x and y axes (diagrams turn their axes off and need only the title). `build.py` starts the notebook
kernels with this rule installed (`_ext/figure_rule.py`), so a figure that breaks it fails its cell and the build.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

BOOK = Path(__file__).resolve().parent
ROOT = BOOK.parent
sys.path.insert(0, str(BOOK / "_ext"))

# The version of MathJax that build.py fetches (npm) and the entry point the pages load.
MATHJAX_VERSION = "3.2.2"
MATHJAX_ENTRY = "mathjax/tex-mml-chtml.js"

# Seconds one notebook cell may run before the build fails. Chapters run in <= 3 minutes with a
# warm cache; a cold cache adds pretraining the tutorial base (a few minutes) to one cell.
CELL_TIMEOUT = int(os.environ.get("LORA_REF_BOOK_CELL_TIMEOUT", "1200"))


def _link_notebooks() -> None:
    """Make `book/notebooks` point at the repository's `notebooks/` folder."""
    link = BOOK / "notebooks"
    if link.is_symlink():
        if link.resolve() != (ROOT / "notebooks").resolve():
            raise RuntimeError(f"{link} points to {os.readlink(link)}, expected ../notebooks")
        return
    if link.exists():
        raise RuntimeError(f"{link} exists and is not the symlink to ../notebooks; remove it")
    link.symlink_to(Path("..") / "notebooks", target_is_directory=True)


_link_notebooks()

if not (BOOK / "_static" / MATHJAX_ENTRY).is_file():
    raise RuntimeError(
        f"no local MathJax at book/_static/{MATHJAX_ENTRY}: build the book with `make book` "
        "(book/build.py fetches it once with npm)"
    )

project = "lora_ref"
author = "the lora_ref authors"
copyright = "lora_ref authors"
language = "en"

extensions = [
    "myst_nb",
    "sphinxcontrib.bibtex",
    "sphinx_design",  # {dropdown} boxes for the bit-exact detail a first reading can skip
    "lora_ref_book",
]

root_doc = "index"
exclude_patterns = [
    "_build",
    "_static",
    "_ext",
    "build.py",
    "Thumbs.db",
    ".DS_Store",
    "**.ipynb_checkpoints",
    "notebooks/README*",
    "examples/*.md",
]
suppress_warnings: list[str] = []

# --- MyST and notebook execution -----------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist", "substitution"]
myst_heading_anchors = 3

nb_execution_mode = "force"
nb_execution_timeout = CELL_TIMEOUT
nb_execution_in_temp = False  # run in notebooks/, like JupyterLab
nb_execution_allow_errors = False  # any failing cell fails the notebook
nb_execution_raise_on_error = False  # report as a warning (an error under -W) and keep going
nb_execution_show_tb = False  # build.py prints the failing cell and its traceback once
nb_merge_streams = True
# Cells display tables with IPython.display.Markdown: parse those outputs as MyST (GFM tables, math), not as
# plain CommonMark, which has no tables and would print the pipes as a paragraph.
nb_render_markdown_format = "myst"
nb_output_stderr = "show"
# Widget views (for example a tqdm bar when ipywidgets is installed) would need require.js and the
# widget manager from a CDN: render their text/plain form instead and load no widget script.
nb_ipywidgets_js: dict = {}
nb_mime_priority_overrides = [
    ("html", "application/vnd.jupyter.widget-view+json", None),
    ("html", "application/vnd.jupyter.widget-state+json", None),
]

# --- Bibliography ---------------------------------------------------------------------------------
bibtex_bibfiles = ["references.bib"]
bibtex_default_style = "plain"
bibtex_reference_style = "author_year"

# --- Math: a local MathJax 3, never a CDN -----------------------------------------------------------
mathjax_path = MATHJAX_ENTRY

# --- HTML -----------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "lora_ref: LoRA, QLoRA and merging from first principles"
html_static_path = ["_static"]
html_css_files = ["lora_ref.css"]
# The theme's light/dark switch starts in "auto" (the reader's system setting). Left unset, a first visit (empty
# localStorage) logs "Got invalid theme mode" as a console error, which the browser pass (browser_check.py) rejects.
html_context = {"default_mode": "auto"}
html_last_updated_fmt = None
html_show_sourcelink = False
html_copy_source = True
html_theme_options = {
    "home_page_in_toc": True,
    "show_toc_level": 2,
    "use_download_button": True,
    "use_fullscreen_button": False,
    "use_repository_button": False,
    "use_issues_button": False,
    "use_source_button": False,
    "launch_buttons": {},
    "navigation_with_keys": False,
    "analytics": {},
    "icon_links": [],
}
