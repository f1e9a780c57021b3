"""The one exception family for mistakes a user can make, and the wrapper every command line runs under.

Anything a user can get wrong (a layout key, a `train.*` value, a data path, a checkpoint directory, an export
target) raises a subclass of `UserError` whose message names the file, line or key and says what was expected.
`cli()` turns it into one line on stderr and exit status 2; `--debug` (or BRAIDLM_DEBUG=1) shows the traceback.
Internal invariants stay `assert`s and real bugs keep their tracebacks.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional, Sequence


class UserError(ValueError):
    """A mistake in something the user gave us; the message names where (file, line, key) and what is allowed."""


class ConfigError(UserError):
    """A bad `train.*` value or command-line option."""


class DataError(UserError):
    """A training / evaluation data path or file that cannot be read as text."""


class CheckpointError(UserError):
    """A checkpoint directory or file that is missing, incomplete, truncated or of the wrong kind."""


def cli(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Run `main(argv)` as a command: a UserError prints `error: ...` and returns 2 (no traceback unless
    `--debug` is among the arguments or BRAIDLM_DEBUG=1). Returns main's status (0 when it returns None)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("BRAIDLM_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return int(main(argv) or 0)
    except Exception as e:
        # an unknown HYBRID_KERNELS value is the user's too; it can only come from an imported `kernels` (looked up
        # here rather than imported, so that commands without kernels, like training.prepare, need no torch)
        kernels = sys.modules.get("kernels")
        backend_error = getattr(kernels, "KernelBackendError", None)
        if debug or not (isinstance(e, UserError) or (backend_error is not None and isinstance(e, backend_error))):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
