"""What every entry script shares: configuration, logging, and one-line errors with a non-zero exit."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from omegaconf import DictConfig

from s2match.config import load_config
from s2match.s2.products import ProductError

# Errors a user can cause with bad input or configuration: reported in one line, no traceback.
USER_ERRORS = (ProductError, FileNotFoundError, ValueError, KeyError)


def run(main: Callable[[DictConfig], int | None]) -> None:
    """Load the configuration from the command line, run `main(cfg)`, exit with its status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        status = main(load_config())
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    sys.exit(status or 0)
