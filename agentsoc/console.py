"""Where messages go: every module logs through :mod:`logging`; the command line decides how they show.

Messages are written through tqdm so a warning never tears a progress bar in half, and always to
stderr, so ``--json`` output on stdout stays machine-readable.
"""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # a logging handler must never raise into the code that logged
            self.handleError(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"agentsoc: {level}{record.getMessage()}"


def configure(*, quiet: bool = False, verbose: bool = False) -> None:
    """Route the project's loggers (``agentsoc.*``, ``backends.*``) to stderr for a person to read.

    ``quiet`` keeps warnings and errors only; ``verbose`` adds debug detail.
    """
    handler = _TqdmHandler()
    handler.setFormatter(_Formatter())
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    for name in ("agentsoc", "backends"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]  # replaced, not added: configuring twice never prints twice
        logger.setLevel(level)
        # records still reach the root logger (no handler there unless the embedding program adds
        # one, which then sees them too, as a library's user expects)
