"""The per-download deadline: a watchdog thread cuts sockets past their deadline."""

from __future__ import annotations

import socket
import threading

from pipeline.deadline import Watchdog, attach


def test_finished_downloads_do_not_pile_up_until_their_deadline():
    with Watchdog() as watchdog:
        for _ in range(1000):
            with watchdog.deadline(60):
                pass
        assert watchdog.pending() <= 64 + 1  # not 1,000 tickets kept for a minute


def test_a_running_download_is_still_cut_after_finished_ones_are_dropped():
    left, right = socket.socketpair()
    attached, result = threading.Event(), {}

    def download() -> None:
        with watchdog.deadline(0.5) as ticket:
            attach(left)
            attached.set()
            result["data"] = left.recv(1)  # blocks: nothing is ever sent
            result["fired"] = ticket.fired

    with left, right, Watchdog() as watchdog:
        thread = threading.Thread(target=download)
        thread.start()
        assert attached.wait(5)
        for _ in range(500):  # enough finished tickets to make the watchdog compact its heap
            with watchdog.deadline(60):
                pass
        thread.join(5)
        assert not thread.is_alive()
    assert result == {"data": b"", "fired": True}
