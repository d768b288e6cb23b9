"""The daemon's log: a file in the runtime directory, and stderr in the foreground."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def setup_logging(path: Path, debug: bool = False, to_stderr: bool = False) -> None:
    fmt = logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    handler: logging.Handler = logging.FileHandler(path)
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if to_stderr:
        err = logging.StreamHandler(sys.stderr)
        err.setFormatter(fmt)
        root.addHandler(err)
