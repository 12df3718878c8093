"""What dead hosts cost a run: URLs whose hosts refuse every connection, run with the real command.

    python -m pipeline.bench.deadhosts [--urls 100000] [--hosts 8] [--silent 0.0] [--config FILE]

Binds ``--hosts`` loopback sockets (127.0.0.1 .. 127.0.0.4, ports chosen by the system) without
listening on them, so each refuses connections at once, writes ``--urls`` distinct URLs spread
over them, runs ``pipeline run`` on the list (``-q``, the given config or the defaults) and
prints the rows per second, seen from outside (start-up included), and the failed kinds.

``--silent`` puts that share of the URLs (evenly spread) on as many silent hosts: sockets that
listen with a backlog of 0, already filled by a connection of the benchmark's own and never
accepted, so the kernel drops every SYN and each connect waits for ``download.connect_timeout``
(a host that went away without a word, on the open web).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def refusing(count: int) -> tuple[contextlib.ExitStack, list[str]]:
    """``count`` bound, non-listening loopback sockets; their ``host:port``."""
    stack = contextlib.ExitStack()
    hosts = []
    for i in range(count):
        sock = stack.enter_context(socket.socket())
        sock.bind((f"127.0.0.{1 + i % 4}", 0))
        host, port = sock.getsockname()
        hosts.append(f"{host}:{port}")
    return stack, hosts


def silent(count: int, stack: contextlib.ExitStack) -> list[str]:
    """``count`` loopback sockets that never complete a connection; their ``host:port``."""
    hosts = []
    for i in range(count):
        sock = stack.enter_context(socket.socket())
        sock.bind((f"127.0.0.{5 + i % 4}", 0))
        sock.listen(0)
        filler = stack.enter_context(socket.create_connection(sock.getsockname()))  # the backlog
        filler.setblocking(False)
        host, port = sock.getsockname()
        hosts.append(f"{host}:{port}")
    return hosts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.deadhosts")
    parser.add_argument("--urls", type=int, default=100_000)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--silent", type=float, default=0.0, help="share on silent hosts")
    parser.add_argument("--config", type=Path, help="a config.toml (default: the defaults)")
    args = parser.parse_args(argv)
    stack, hosts = refusing(args.hosts)
    quiet = silent(args.hosts, stack) if args.silent else []
    every = 1 / args.silent if args.silent else 0.0
    chosen = {round(i * every) for i in range(round(args.urls * args.silent))}
    with stack, tempfile.TemporaryDirectory(prefix="deadhosts-") as tmp:
        folder = Path(tmp)
        with (folder / "urls.txt").open("w") as out:
            for i in range(args.urls):
                where = quiet if i in chosen else hosts
                out.write(f"http://{where[i % len(where)]}/{i}.jpg\n")
        command = [sys.executable, "-m", "pipeline", "run", "urls.txt", "--out", "out", "-q"]
        command += ["--config", str(args.config.resolve())] if args.config else []
        started = time.monotonic()
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True, check=False)
        wall = time.monotonic() - started
        if done.returncode != 0:
            raise SystemExit(f"the run failed (exit {done.returncode}): {done.stderr.strip()}")
        report = json.loads((folder / "out" / "report.json").read_text())
    sys.stdout.write(
        f"{args.urls} URLs on {len(hosts)} refusing hosts"
        + (f" ({len(chosen)} on {len(quiet)} silent ones)" if quiet else "")
        + f": {wall:.1f} s, "
        f"{args.urls / wall:.0f} rows/s; failed {report['failed']}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
