"""A man-in-the-middle on the GHCx channel, between QEMU's chardev and the TSM.

It stands where the untrusted VMM stands (docs/ghcx.md) and holds no secret.  It forwards
frames both ways and attacks on a schedule: it replays the guest's first encrypted request
(after forwarding it), alters the payload of one response on its way to the guest, and
sends garbage bytes ahead of a frame in each direction.  The TSM must reject the replay,
the guest must reject the altered response and retry, both must resynchronise past the
garbage, and the flow must still succeed.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

from teeio.ghcx import FrameDecoder, GhcxReject, Header, MsgType, encode_frame

GARBAGE = b"\x00\xffnot a GHCX frame\xff\x00"


class GhcxRelay:
    def __init__(self, listen: Path, upstream: Path, *, alter_response: int = 2) -> None:
        self.listen, self.upstream = listen, upstream
        self.alter_response = alter_response     # which encrypted response (1-based) to alter
        self.actions: dict[str, int] = {"replayed": 0, "altered": 0, "garbage": 0,
                                        "frames_up": 0, "frames_down": 0, "connections": 0}
        self._lock = threading.Lock()
        self._replayed = False
        self._responses = 0
        listen.unlink(missing_ok=True)
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(str(listen))
        self._srv.listen(4)
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, name="ghcx-relay", daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._srv.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                guest, _ = self._srv.accept()
            except OSError:
                return
            try:
                tsm = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                tsm.connect(str(self.upstream))
            except OSError:
                guest.close()
                continue
            self._socks += [guest, tsm]
            self.actions["connections"] += 1
            threading.Thread(target=self._pump, args=(guest, tsm, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(tsm, guest, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        dec = FrameDecoder()
        first_garbage = True
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                for body in dec.feed(data):
                    out = [encode_frame(body)]
                    hdr = _header(body)
                    with self._lock:
                        if first_garbage and hdr is not None and hdr.seq > 0:
                            out.insert(0, GARBAGE)
                            self.actions["garbage"] += 1
                            first_garbage = False
                        if up:
                            self.actions["frames_up"] += 1
                            if (not self._replayed and hdr is not None and hdr.seq > 0
                                    and hdr.mtype != MsgType.HELLO):
                                out.append(encode_frame(body))      # the replay
                                self._replayed = True
                                self.actions["replayed"] += 1
                        else:
                            self.actions["frames_down"] += 1
                            if hdr is not None and hdr.seq > 0:
                                self._responses += 1
                                if self._responses == self.alter_response:
                                    bad = bytearray(body)
                                    bad[-1] ^= 0x01                  # last byte of the tag
                                    out = [encode_frame(bytes(bad))]
                                    self.actions["altered"] += 1
                    dst.sendall(b"".join(out))
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


def _header(body: bytes) -> Header | None:
    try:
        return Header.decode(body)
    except GhcxReject:
        return None
