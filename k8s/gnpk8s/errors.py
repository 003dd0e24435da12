"""The one error type of the k8s tooling: a problem the user can fix (the CLI prints one line, exit 2)."""

from __future__ import annotations

from trainer.exits import EXIT_USER  # 2: permanent under the ExitCode restart policy

__all__ = ["EXIT_USER", "UserError"]


class UserError(Exception):
    """A problem the user can fix; the CLI prints it as one line `error: ...` and exits EXIT_USER."""
