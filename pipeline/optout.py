"""Publishers' opt-outs: the ``X-Robots-Tag`` response header, read before any body byte.

    X-Robots-Tag: noai                         every robot
    X-Robots-Tag: mybot: noimageai, nofollow   only the robot mybot (download.user_agent_token)
    X-Robots-Tag: otherbot: noai               not us

A header may carry several comma-separated directives; a ``name:`` prefix starts the part of the
header addressed to that robot, up to the next prefix (a server may also send several headers,
each read on its own). Directives and names compare case-insensitively. Directives with a value
(``max-snippet: 20``, ``unavailable_after: <date>``) are not robot names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# directives of the form "name: value": the name is no robot's
_VALUED = frozenset({"max-snippet", "max-image-preview", "max-video-preview", "unavailable_after"})
_ROBOT = re.compile(r"[a-z0-9][a-z0-9_.-]*")


def refusal(headers: Iterable[str], token: str, disallowed: Iterable[str]) -> str | None:
    """The first directive of ``disallowed`` that ``headers`` (each X-Robots-Tag value) apply to
    the robot ``token`` ("" : none of ours) or to every robot; None when there is none."""
    refused = {directive.lower() for directive in disallowed}
    if not refused:
        return None
    token = token.lower()
    for header in headers:
        robot: str | None = None  # the whole header applies to every robot, until a prefix
        for item in header.split(","):
            name, colon, rest = item.partition(":")
            name = name.strip().lower()
            if colon and name not in _VALUED and _ROBOT.fullmatch(name):
                robot, item = name, rest
            directive = item.strip().lower()
            if directive in refused and (robot is None or robot == token):
                return f"{robot}: {directive}" if robot else directive
    return None
