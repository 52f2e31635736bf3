"""Progress of the long runs that fill the artifact cache: a bar where the run is watched, lines where it is not.

A chapter's cached run (a fine-tune, the pretraining of the tutorial base, a sweep) trains for seconds to many
minutes the first time and only loads afterwards. While it trains, two readers want to know how far it is:

- the learner running the notebook or the command sees a tqdm bar on stderr (:func:`bar`; ``tqdm.auto``, so a
  widget in JupyterLab), as before;
- the person running ``make book`` or ``make warm-cache`` sees nothing of a notebook kernel's output, so when
  ``$LORA_REF_PROGRESS_LOG`` names a file, :func:`bar` also appends one plain line to it when a run starts, every
  :data:`LOG_EVERY_S` seconds while it trains and when it ends, and :func:`log` appends the lines that
  :func:`lora_ref.files.cache.get_or_build` writes when it starts and finishes building an artifact. The book's
  build scripts set the variable and print the file's new lines on their console as they arrive.

Without the variable nothing is written anywhere but the bar.
"""

from __future__ import annotations

import os
import sys
import time

ENV = "LORA_REF_PROGRESS_LOG"
LOG_EVERY_S = 15.0


def log(message: str) -> None:
    """Append ``message`` as one line to ``$LORA_REF_PROGRESS_LOG`` when it is set; otherwise do nothing."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = " ".join(message.split()) + "\n"
    with open(path, "a", encoding="utf-8") as f:  # append mode: lines of concurrent writers do not interleave
        f.write(line)


class Bar:
    """A tqdm bar on stderr that also logs its progress (see the module docstring); the calls tqdm users make.

    ``set_postfix(**values)`` (shown on the bar and in the logged lines), ``update(n)``, ``close()``; also a
    context manager.
    """

    def __init__(self, total: int, desc: str, enabled: bool = True):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                         leave=False)
        self.total, self.desc, self.n = total, desc, 0
        self._enabled = enabled
        self._postfix = ""
        self._start = self._last = time.monotonic()
        self._closed = False
        if enabled:
            log(f"{desc}: started ({total} steps)")

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self._bar.set_postfix(refresh=refresh, **values)
        self._postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self._bar.update(n)
        self.n += n
        now = time.monotonic()
        if self._enabled and now - self._last >= LOG_EVERY_S:
            self._last = now
            elapsed = now - self._start
            left = elapsed / self.n * (self.total - self.n) if self.n else float("nan")
            log(f"{self.desc}: {self.n}/{self.total} steps, {elapsed:.0f} s, about {left:.0f} s left"
                + (f" ({self._postfix})" if self._postfix else ""))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._bar.close()
        if self._enabled:
            what = "done" if self.n >= self.total else f"stopped at {self.n}/{self.total} steps"
            log(f"{self.desc}: {what} in {time.monotonic() - self._start:.0f} s"
                + (f" ({self._postfix})" if self._postfix else ""))

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *_exc_info) -> None:
        self.close()


def bar(total: int, desc: str, enabled: bool = True) -> Bar:
    """A :class:`Bar` of ``total`` steps labelled ``desc``; ``enabled=False`` shows and logs nothing."""
    return Bar(total, desc, enabled)
