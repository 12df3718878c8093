"""A child process that ends with its parent: the transform workers, the sink's packer, a lane.

Used wherever a process is started that must not outlive the one that owns the run, even when
that one is killed outright (kill -9): it depends on nothing else of the package.
"""

from __future__ import annotations

import os
import select
import threading


def exit_with(pid: int) -> None:
    """End this process when process ``pid`` ends, even by SIGKILL.

    A worker of a killed run would wait forever: it holds both ends of the pool's task pipe, so
    it never sees an end of file, and it keeps the forkserver alive too. A pidfd becomes readable
    when its process exits; one thread blocks on it. It is a daemon thread on purpose: it must
    never hold up the process's own exit.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): the old behaviour
        return

    def wait() -> None:
        select.select([pidfd], [], [])
        os._exit(1)

    threading.Thread(target=wait, name="main-process-watch", daemon=True).start()
