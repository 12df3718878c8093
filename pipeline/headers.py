"""A response's header block, read as http.client reads it, without the email package's parser
when every line is a plain ``Name: value``.

http.client reads the header lines (at most ``_MAXHEADERS``, each at most ``_MAXLINE`` bytes),
decodes them as ISO-8859-1 and hands them to ``email.parser``: a feed parser built per response,
which splits, matches and re-joins the text line by line, a third of the CPU http.client spends
on a response's head (cProfile, loopback). ``parse_headers`` reads the same lines as
http.client's reader does (its limits, its errors), and when each line is ``token ":" value
CRLF`` (a name of the characters the email parser takes as one, no folded line, no stray CR) it
fills the ``HTTPMessage`` directly, as the email parser would: the same names, values and order,
a repeated header kept as two (``X-Robots-Tag`` is read header by header). Any other block (a
folded line, a line without a colon, a name with a space, a bare CR) goes to the email parser,
as before: what it makes of it stays the reference.
"""

from __future__ import annotations

import email.parser
import http.client
import re
from typing import BinaryIO

# a line the email parser reads as one header, name and value, and nothing else: the name's
# characters are its header pattern's ([\041-\071\073-\176]: printable, no colon); the value is
# the rest, leading blanks dropped, up to the line's end (no CR or LF in it). (No line of it
# starts "From ", which the email parser reads as an mbox envelope: the name has no space.)
_PLAIN = re.compile(rb"([!-9;-~]+):[ \t]*([^\r\n]*)\r?\n")


# http.client's limits: a header line's bytes, and header lines in a block
MAX_LINE: int = getattr(http.client, "_MAXLINE", 65536)
MAX_HEADERS: int = getattr(http.client, "_MAXHEADERS", 100)


def read_lines(fp: BinaryIO) -> list[bytes]:
    """The header block's lines, the blank line that ends it last (b"" if the connection
    closed first), read as http.client reads them, with its errors past its limits."""
    lines = []
    while True:
        line = fp.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise http.client.LineTooLong("header line")
        lines.append(line)
        if len(lines) > MAX_HEADERS:
            raise http.client.HTTPException(f"got more than {MAX_HEADERS} headers")
        if line in (b"\r\n", b"\n", b""):
            return lines


def parse_headers(fp: BinaryIO) -> http.client.HTTPMessage:
    """The header block at ``fp``, as ``http.client.parse_headers(fp)`` returns it; raises its
    errors (LineTooLong, HTTPException) past the same limits."""
    lines = read_lines(fp)
    message = _plain(lines)
    if message is None:  # anything unusual: the email parser decides, as http.client's does
        text = b"".join(lines).decode("iso-8859-1")
        message = email.parser.Parser(_class=http.client.HTTPMessage).parsestr(text)
    return message


def _plain(lines: list[bytes]) -> http.client.HTTPMessage | None:
    """The message of a block of plain header lines; None when a line is anything else."""
    fields = []
    for line in lines[:-1]:  # the last is the blank line (or b"": the connection closed)
        match = _PLAIN.fullmatch(line)
        if match is None:
            return None
        name, value = match.groups()
        fields.append((name.decode("ascii"), value.decode("iso-8859-1")))
    message = http.client.HTTPMessage()
    message._headers = fields  # type: ignore[attr-defined]  # what Message.set_raw appends to
    message.set_payload("")  # what the email parser leaves after a blank line (no body read)
    return message
