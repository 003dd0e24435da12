"""The one error type of the k8s tooling: a problem the user can fix (the CLI prints one line, exit 2).

The exit statuses are trainer/exits.py's values, written out here rather than imported: the k8s tooling runs
from a laptop venv with only kubernetes + pyyaml (make render/submit/...), and nothing in it imports the
trainer package at import time. tests/test_k8s_light.py checks they equal trainer.exits.
"""

from __future__ import annotations

EXIT_USER = 2  # trainer.exits.EXIT_USER: permanent under the ExitCode restart policy
EXIT_CRASH_LOOP = 3  # trainer.exits.EXIT_CRASH_LOOP: crash_restarts starts in a row from one checkpoint crashed
FIRST_RETRIED = 128  # trainer.exits.FIRST_RETRIED: the training operator retries statuses from here up

__all__ = ["EXIT_CRASH_LOOP", "EXIT_USER", "FIRST_RETRIED", "UserError"]


class UserError(Exception):
    """A problem the user can fix; the CLI prints it as one line `error: ...` and exits EXIT_USER."""
