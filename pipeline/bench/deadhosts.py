"""What dead hosts cost a run: URLs whose hosts refuse every connection, run with the real command.

    python -m pipeline.bench.deadhosts [--urls 100000] [--hosts 8] [--config FILE]

Binds ``--hosts`` loopback sockets (127.0.0.1 .. 127.0.0.4, ports chosen by the system) without
listening on them, so each refuses connections at once, writes ``--urls`` distinct URLs spread
over them, runs ``pipeline run`` on the list (``-q``, the given config or the defaults) and
prints the rows per second, seen from outside (start-up included), and the failed kinds.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.deadhosts")
    parser.add_argument("--urls", type=int, default=100_000)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--config", type=Path, help="a config.toml (default: the defaults)")
    args = parser.parse_args(argv)
    stack, hosts = refusing(args.hosts)
    with stack, tempfile.TemporaryDirectory(prefix="deadhosts-") as tmp:
        folder = Path(tmp)
        with (folder / "urls.txt").open("w") as out:
            for i in range(args.urls):
                out.write(f"http://{hosts[i % len(hosts)]}/{i}.jpg\n")
        command = [sys.executable, "-m", "pipeline", "run", "urls.txt", "--out", "out", "-q"]
        command += ["--config", str(args.config.resolve())] if args.config else []
        started = time.monotonic()
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True, check=False)
        wall = time.monotonic() - started
        if done.returncode != 0:
            raise SystemExit(f"the run failed (exit {done.returncode}): {done.stderr.strip()}")
        report = json.loads((folder / "out" / "report.json").read_text())
    sys.stdout.write(
        f"{args.urls} URLs on {len(hosts)} refusing hosts: {wall:.1f} s, "
        f"{args.urls / wall:.0f} rows/s; failed {report['failed']}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
