"""What a person sees on the console while work runs: progress bars and this package's log lines, both on
stderr. The bottom layer: data, training, the pipeline and the command lines all use it."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable


def progress(iterable: Iterable | None = None, *, desc: str | None = None, disable: bool = False, **kw):
    """A tqdm bar on stderr, as wide as the terminal. A terminal that reports no size (a pseudo-terminal never
    sized, as under `script` or some CI runners) and a pipe get 100 columns: tqdm would otherwise draw empty
    lines there. Disabled, an iterable is returned as it is; without an iterable the bar is updated by hand
    (`bar.update(n)`, a no-op when disabled)."""
    if disable and iterable is not None:
        return iterable
    from tqdm.auto import tqdm

    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        size = os.terminal_size((0, 0))
    shape = {"dynamic_ncols": True} if min(size) > 0 else {"ncols": 100, "nrows": 20}
    return tqdm(iterable, desc=desc, file=sys.stderr, disable=disable, **{"leave": True, **shape, **kw})


def log_to_stderr() -> None:
    """The CLIs' logging: this package's INFO messages on stderr, bare, once."""
    ours = logging.getLogger("debkd_jax")
    ours.setLevel(logging.INFO)
    ours.propagate = False
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        ours.addHandler(handler)
