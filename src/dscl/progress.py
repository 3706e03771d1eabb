"""Progress bars on a terminal only: when stderr is not a terminal (a log file, CI), no bar is
drawn, so a log gets the one line per epoch that a run writes instead of thousands of
carriage-return updates."""

from __future__ import annotations

from tqdm import tqdm


def progress(iterable=None, *, enabled: bool = True, **options) -> tqdm:
    """``tqdm(iterable, **options)``, drawn only when ``enabled`` and stderr is a terminal."""
    return tqdm(iterable, disable=None if enabled else True, **options)
