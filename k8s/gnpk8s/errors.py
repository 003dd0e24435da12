"""The one error type of the k8s tooling: a problem the user can fix (the CLI prints one line, exit 2).

The exit statuses come from trainer/exits.py, their one source: that module is plain Python (no torch, no
third-party import), so the light client (kubernetes + PyYAML, `make render/submit/...` from a laptop) loads it
like the rest of the checkout; tests/test_k8s_light.py checks that it is all the k8s package takes from trainer/
at import time.
"""

from __future__ import annotations

from trainer.exits import EXIT_CRASH_LOOP, EXIT_USER, FIRST_RETRIED

__all__ = ["EXIT_CRASH_LOOP", "EXIT_USER", "FIRST_RETRIED", "UserError"]


class UserError(Exception):
    """A problem the user can fix; the CLI prints it as one line `error: ...` and exits EXIT_USER."""
