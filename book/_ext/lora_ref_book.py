"""Sphinx extension for the lora_ref book: the `chapter-index` directive, and each notebook's execution time.

At the end of a build, :func:`write_execution_times` writes what myst-nb recorded about executing each notebook
(seconds, success) to ``<doctrees>/execution.json``; `book/build.py` prints it as a table.

The directive's content is one line per chapter, ``stem | modules | what the chapter shows``,
for example::

    01_autograd | lora_ref.autograd.tensor, lora_ref.autograd.numerical | Reverse-mode autograd from scratch.

It renders a table linking each chapter that exists in `notebooks/` (its title comes from the
notebook's first heading) to the `lora_ref` modules it teaches. A planned chapter without a notebook
yet is listed without a link. A notebook in `notebooks/` that the index does not list is a warning,
so `make book` (warnings are errors) keeps the index complete.
"""

from __future__ import annotations

import json
from pathlib import Path

from docutils import nodes
from sphinx import addnodes
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)


def parse_chapter_index(lines: list[str]) -> list[tuple[str, list[str], str]]:
    """Parse ``stem | module, module | summary`` lines (blank lines skipped) into tuples."""
    rows = []
    for line in lines:
        if not line.strip():
            continue
        parts = [part.strip() for part in line.split("|")]
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise ValueError(f"chapter-index line {line!r}: expected 'stem | modules | summary'")
        modules = [m.strip() for m in parts[1].split(",") if m.strip()]
        rows.append((parts[0], modules, parts[2]))
    return rows


class ChapterIndex(SphinxDirective):
    """A table of chapters and the lora_ref modules each one teaches."""

    has_content = True

    def run(self) -> list[nodes.Node]:
        try:
            rows = parse_chapter_index(list(self.content))
        except ValueError as err:
            raise self.error(str(err)) from err
        notebooks = Path(self.env.srcdir) / "notebooks"
        present = {p.stem for p in notebooks.glob("[0-9][0-9]_*.ipynb")}
        listed = {stem for stem, _, _ in rows}
        for stem in sorted(present - listed):
            logger.warning(
                "notebook notebooks/%s.ipynb is missing from the chapter index (book/chapters.md)",
                stem,
                location=self.get_location(),
            )

        table = nodes.table(classes=["chapter-index", "colwidths-given"])
        group = nodes.tgroup(cols=3)
        table += group
        for width in (28, 27, 45):
            group += nodes.colspec(colwidth=width)
        head = nodes.thead()
        group += head
        head += self._row([nodes.Text("Chapter")], [nodes.Text("Teaches")], [nodes.Text("Shows")])
        body = nodes.tbody()
        group += body
        for stem, modules, summary in rows:
            if stem in present:
                chapter = addnodes.pending_xref(
                    "",
                    nodes.inline("", stem),
                    refdomain="std",
                    reftype="doc",
                    reftarget=f"/notebooks/{stem}",
                    refexplicit=False,
                    refdoc=self.env.docname,
                    refwarn=True,
                )
                chapter_cell = [nodes.Text(f"{stem[:2]}. "), chapter]
            else:
                chapter_cell = [nodes.literal("", stem), nodes.Text(" (not in this build)")]
            module_cell: list[nodes.Node] = []
            for i, module in enumerate(modules):
                if i:
                    module_cell.append(nodes.Text(", "))
                module_cell.append(nodes.literal("", module))
            body += self._row(chapter_cell, module_cell, [nodes.Text(summary)])
        return [table]

    @staticmethod
    def _row(*cells: list[nodes.Node]) -> nodes.row:
        row = nodes.row()
        for content in cells:
            entry = nodes.entry()
            entry += nodes.paragraph("", "", *content)
            row += entry
        return row


EXECUTION_FILE = "execution.json"


def write_execution_times(app, exception) -> None:
    """``{docname: {"seconds": runtime, "succeeded": bool}}`` of every notebook executed in this build."""
    found = {}
    for docname, data in sorted(getattr(app.env, "nb_metadata", {}).items()):
        run = data.get("exec_data")
        if run:
            found[docname] = {"seconds": run.get("runtime"), "succeeded": bool(run.get("succeeded"))}
    (Path(app.doctreedir) / EXECUTION_FILE).write_text(json.dumps(found, indent=1) + "\n")


def setup(app):
    app.add_directive("chapter-index", ChapterIndex)
    app.connect("build-finished", write_execution_times)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
