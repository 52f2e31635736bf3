"""What a tour section gets: the output folder, the flags, and writers for the report."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TourContext:
    """What a section gets: the output folder (a temporary one, renamed into place at the end), the flags, and
    writers for the report."""

    out: Path
    quick: bool
    progress: bool = True
    state: dict = field(default_factory=dict)  # objects shared between sections
    markdown: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)

    def text(self, md: str) -> None:
        """Append a markdown paragraph (or table, or list) to the report."""
        self.markdown.append(md.strip("\n") + "\n")

    def figure(self, fig, name: str, caption: str) -> str:
        """Save a matplotlib figure as ``<name>.png`` in the output folder and show it in the report."""
        import matplotlib.pyplot as plt

        if not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"figure name must be letters, digits, '-' or '_', got {name!r}")
        if name in self.figures:
            raise ValueError(f"figure name {name!r} is used twice")
        fig.savefig(self.out / f"{name}.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        self.figures.append(name)
        self.text(f"![{caption}]({name}.png)\n\n*{caption}*")
        return f"{name}.png"

    def summarize(self, line: str) -> None:
        """A line of the short summary the command prints at the end."""
        self.summary.append(line)

    def check(self, ok: bool, claim: str) -> None:
        """Assert a claim the report makes; a false one stops the tour with ``ValueError`` (nothing written)."""
        if not ok:
            raise ValueError(f"tour check failed: {claim}")

    def log(self, msg: str) -> None:
        """A progress line on stderr."""
        if self.progress:
            sys.stderr.write(f"[tour] {msg}\n")
            sys.stderr.flush()


# (steps, peak learning rate) of the runs these sections make, for the full and the quick tour. The full tour uses
# the book's settings (experiments.BOOK), so it reads the runs chapters 9-11 made (and they read its runs): the cache
# keys on every setting. The quick tour trains shorter runs on the quick base.
def full_settings(quick: bool) -> tuple[int, float]:
    from lora_ref.analysis.experiments import BOOK

    return (30, 1e-3) if quick else (BOOK["steps"], BOOK["lr_full"])


def lora_settings(quick: bool) -> tuple[int, float]:
    from lora_ref.analysis.experiments import BOOK

    return (20, 3e-3) if quick else (BOOK["steps"], BOOK["lr_lora"])


def tutorial_base(ctx):
    from lora_ref.modeling.llama import Llama
    from lora_ref.training import tutorial

    if "base" not in ctx.state:
        ctx.state["base"] = Llama.from_pretrained(tutorial.pretrained_base_dir(ctx.quick, progress=ctx.progress)
                                                  / "model")
    return ctx.state["base"]
