"""A fork server for the crash test (test_crash.py): it imports the gallery server once, then forks a
fresh `gallery serve` process for every line it reads on stdin (the line names the child's log
file) and answers the child's pid.

Each child is a real server process, running the real serve() from a clean fork (grpc and the
database are first touched in the child, never in this parent), so SIGKILLing it is a real crash.
What forking saves is ~0.7 s of CPU for imports per restart, which 200 restarts on a 2-CPU machine
cannot afford.
"""

from __future__ import annotations

import os
import signal
import sys

from gallery_server import cli
from gallery_server.rpc import server  # noqa: F401  (the import cost is paid here, once)


def main() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the killed children
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            log = os.open(line.strip(), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            code = 1
            try:
                code = cli.main(["serve"])
            finally:
                os._exit(code)
        print(pid, flush=True)


if __name__ == "__main__":
    main()
