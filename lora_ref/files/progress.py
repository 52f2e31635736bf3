"""Progress of the long runs that fill the artifact cache: where the run is watched, and where it is not.

A chapter's cached run (a fine-tune, the pretraining of the tutorial base, a sweep) trains for seconds to many
minutes the first time and only loads afterwards. While it trains, three readers want to know how far it is:

- someone running a command or a script sees a tqdm bar on stderr when the function is called with
  ``progress=True`` (:func:`bar`), as before;
- a learner running a notebook sees one **status line** under the cell, updated in place, from the moment a cached
  artifact starts being built until it is stored ("cache: built … in 35 s"), even when the chapter turned the tqdm
  bar off (``progress=False``, which keeps the rendered pages clean). It is shown only inside a Jupyter kernel, and
  only while something is actually built: a warm cache shows nothing;
- the person running ``make book`` or ``make warm-cache`` sees nothing of a notebook kernel's output, so when
  ``$LORA_REF_PROGRESS_LOG`` names a file, every message is also appended to it as one line: when a build starts,
  every :data:`LOG_EVERY_S` seconds while a run trains, when it ends. The book's build scripts set the variable and
  print the file's new lines on their console as they arrive.

Outside a Jupyter kernel and without the variable, nothing is written anywhere but the tqdm bar.
"""

from __future__ import annotations

import os
import sys
import time

ENV = "LORA_REF_PROGRESS_LOG"
LOG_EVERY_S = 15.0  # between two lines in the log file
SHOW_EVERY_S = 1.0  # between two updates of a notebook's status line

_status = None  # the notebook's status line of the artifact being built (an IPython DisplayHandle), if any


def _kernel_shell():
    """The IPython shell when we run inside a Jupyter kernel, else None."""
    if "IPython" not in sys.modules:
        return None
    shell = sys.modules["IPython"].get_ipython()
    return shell if shell is not None and type(shell).__name__ == "ZMQInteractiveShell" else None


def show(message: str) -> None:
    """Put ``message`` on the notebook's status line (created on first use) when in a Jupyter kernel."""
    global _status
    if _kernel_shell() is None:
        return
    from IPython.display import display

    data = {"text/plain": message}
    if _status is None:
        _status = display(data, raw=True, display_id=True)
    else:
        _status.update(data, raw=True)


def end_status() -> None:
    """Leave the current status line as it is; the next message starts a new one."""
    global _status
    _status = None


def log(message: str, *, notebook: bool = True) -> None:
    """Append ``message`` as one line to ``$LORA_REF_PROGRESS_LOG`` when it is set, and show it on the notebook's
    status line (``notebook=True``, inside a Jupyter kernel)."""
    line = " ".join(message.split())
    if notebook:
        show(line)
    path = os.environ.get(ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:  # append mode: lines of concurrent writers do not interleave
        f.write(line + "\n")


class Bar:
    """A training run's progress: a tqdm bar on stderr when ``enabled``, and always the log and status lines.

    ``set_postfix(**values)`` (shown on the bar and in the lines), ``update(n)``, ``close()``; also a context
    manager. With ``enabled=False`` no bar is drawn, but a run that trains still reports through :func:`log` (to
    the build's log file, and to the notebook's status line, which stands in for the bar there).
    """

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self._bar = None  # no tqdm at all when disabled (tqdm.auto warns in a kernel without ipywidgets)
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)
        self.total, self.desc, self.n = total, desc, 0
        self._notebook = not enabled  # a visible bar already tells the notebook
        self._postfix = ""
        self._start = self._logged = self._shown = time.monotonic()
        self._closed = False
        log(f"{desc}: started ({total} steps)", notebook=self._notebook)

    def set_postfix(self, refresh: bool = True, **values) -> None:
        if self._bar is not None:
            self._bar.set_postfix(refresh=refresh, **values)
        self._postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def _line(self, now: float) -> str:
        elapsed = now - self._start
        left = elapsed / self.n * (self.total - self.n) if self.n else float("nan")
        return (f"{self.desc}: {self.n}/{self.total} steps, {elapsed:.0f} s, about {left:.0f} s left"
                + (f" ({self._postfix})" if self._postfix else ""))

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)
        self.n += n
        now = time.monotonic()
        if now - self._logged >= LOG_EVERY_S:
            self._logged = self._shown = now
            log(self._line(now), notebook=self._notebook)
        elif self._notebook and now - self._shown >= SHOW_EVERY_S:
            self._shown = now
            show(self._line(now))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        what = "done" if self.n >= self.total else f"stopped at {self.n}/{self.total} steps"
        log(f"{self.desc}: {what} in {time.monotonic() - self._start:.0f} s"
            + (f" ({self._postfix})" if self._postfix else ""), notebook=self._notebook)

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *_exc_info) -> None:
        self.close()


def bar(total: int, desc: str, enabled: bool = True) -> Bar:
    """A :class:`Bar` of ``total`` steps labelled ``desc``; ``enabled=False``: no tqdm bar (the lines remain)."""
    return Bar(total, desc, enabled)
