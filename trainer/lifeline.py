"""A rank dies with the torchrun agent that started it, under bare torchrun too.

torchrun starts each rank with `start_new_session=True` (a session and process group of its own), so
`kill -9` of torchrun's process group, or the OOM killer taking the agent, leaves the ranks training on: they
keep writing checkpoints beside the rerun that replaces them, and hold the GPU and the rendezvous port.
`python -m trainer.launch` runs each rank through its shim, which asks the kernel for this already; a bare
`torchrun -m trainer train` did not. `python -m trainer` calls `die_with_parent()` first thing when it runs
as a torchrun rank (TORCHELASTIC_RUN_ID is set), so both ways behave alike.

PR_SET_PDEATHSIG (Linux prctl(2)) sends SIGKILL when the thread that forked this process exits: torchrun's
agent starts its workers (subprocess.Popen) from its main thread, so that is when the agent dies. If the
agent died before the request took effect, the rank was already reparented: its parent pid changed between
the two reads, and it exits at once (137, as if killed).
"""

from __future__ import annotations

import os
import signal
import sys

from trainer.exits import signal_status

PR_SET_PDEATHSIG = 1


def under_torchrun(environ=None) -> bool:
    """Whether this process is a rank started by torchrun's agent."""
    return bool((os.environ if environ is None else environ).get("TORCHELASTIC_RUN_ID"))


def die_with_parent() -> bool:
    """Have the kernel SIGKILL this process when its parent dies; False where prctl is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the agent died before the request took effect
        os._exit(signal_status(signal.SIGKILL))
    return True
