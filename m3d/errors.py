"""m3d's error policy, at the bottom of the import graph so that every entry point (the `m3d` command
line and the modules it delegates to) guards itself the same way without importing the command line."""

from __future__ import annotations

import sys
from typing import Callable

USER_ERRORS = (ValueError, OSError)  # a KeyError or IndexError is a bug: its traceback is shown


def run_guarded(
    name: str,
    action: Callable[[], int | None],
    errors: tuple[type[BaseException], ...] = USER_ERRORS,
    on_interrupt: str = "",
) -> int:
    """Run a command's ``action`` as every m3d entry point does: its exit status (None: 0); an error of
    ``errors`` -> one line ``NAME: error: ...`` on stderr and 2; Ctrl-C -> ``NAME: interrupted[; on_interrupt]``
    and 130. Never a traceback for bad input."""
    try:
        code = action()
    except errors as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted" + (f"; {on_interrupt}" if on_interrupt else ""), file=sys.stderr)
        return 130
    return 0 if code is None else code
