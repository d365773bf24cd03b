"""The server's receive side (vfio_user_dev/server.py, Inbox): messages read ahead into one
buffer, whatever way the bytes arrive; SCM_RIGHTS fds to the message they came with,
bounded; oversized messages skipped unbuffered (vfio-user spec "Message Format")."""

from __future__ import annotations

import array
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from vfio_user_dev import protocol as p
from vfio_user_dev.server import Disconnected, Inbox


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def msg(msg_id: int, payload: bytes = b"", size: int | None = None) -> bytes:
    return p.HEADER.pack(msg_id, p.Command.REGION_READ,
                         p.HEADER_SIZE + len(payload) if size is None else size, 0, 0) + payload


def send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])


def take(messages: Iterator[tuple[memoryview, int, int, list[int]]]
         ) -> tuple[int, bytes, list[int]]:
    """(msg_id, the message's bytes, its fds) of the next message."""
    where, at, n, fds = next(messages)
    return p.HEADER.unpack_from(where, at)[0], bytes(where[at:at + n]), fds


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def test_pipelined_and_split_messages_come_out_whole_and_in_order(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    one, two, three = msg(1, b"x" * 16), msg(2), msg(3, b"y" * 40)
    a.sendall(one + two + three[:5])               # two whole and a piece, in one read
    messages = Inbox(b).messages()
    assert take(messages) == (1, one, [])
    assert take(messages) == (2, two, [])
    for i in range(5, len(three)):                 # the rest, a byte at a time
        a.sendall(three[i:i + 1])
    assert take(messages) == (3, three, [])
    a.sendall(msg(4, size=3))                      # a size below the header's own
    assert take(messages) == (4, msg(4, size=3), [])


def test_a_message_that_does_not_fit_behind_the_last_is_moved_to_the_front(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    messages = Inbox(b, capacity=64).messages()
    first, second = msg(1, b"a" * 24), msg(2, b"b" * 40)  # 40 + 56 bytes > 64
    a.sendall(first + second[:10])
    assert take(messages) == (1, first, [])
    a.sendall(second[10:])
    assert take(messages) == (2, second, [])


def test_fds_go_to_the_message_they_were_sent_with(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    r, w = os.pipe()
    try:
        a.sendall(msg(1, b"q" * 8))
        send_fds(a, msg(2, b"z" * 8), [r])        # read together with message 1
        a.sendall(msg(3))
        messages = Inbox(b).messages()
        first, second, third = take(messages), take(messages), take(messages)
        assert first[2] == [] and third[2] == []
        assert len(second[2]) == 1 and os.fstat(second[2][0]).st_ino == os.fstat(r).st_ino
        os.close(second[2][0])
    finally:
        os.close(r)
        os.close(w)


def test_fds_beyond_the_bound_are_closed_at_once_and_the_rest_when_the_client_leaves(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    before = open_fds()
    r, w = os.pipe()
    whole = msg(1, b"p" * 30)
    inbox = Inbox(b, max_fds=2)
    messages = inbox.messages()
    for i in range(10):                  # a byte at a time, each with 2 fds: 20 for one message
        send_fds(a, whole[i:i + 1], [r, w])
    a.sendall(whole[10:])
    _, data, fds = take(messages)
    assert data == whole and len(fds) == 3           # max_fds + 1: the caller refuses it
    for fd in fds:
        os.close(fd)
    send_fds(a, msg(2, size=64)[:8], [r, w])          # a client leaving halfway
    a.close()
    with pytest.raises(Disconnected):
        next(messages)
    inbox.close()
    os.close(r)
    os.close(w)
    assert open_fds() <= before


def test_an_oversized_message_is_skipped_in_chunks_and_the_next_one_is_intact(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    size = p.MAX_MESSAGE + 100
    big = msg(1, size=size) + bytes(size - p.HEADER_SIZE)
    after = msg(2, b"n" * 8)
    writer = threading.Thread(target=a.sendall, args=(big + after,))
    writer.start()
    inbox = Inbox(b)
    messages = inbox.messages()
    where, at, n, fds = next(messages)
    assert (n, fds) == (size, []) and p.HEADER.unpack_from(where, at)[:3] == (
        1, p.Command.REGION_READ, size)
    assert len(where) == p.HEADER_SIZE               # its header alone, kept aside
    assert take(messages) == (2, after, [])
    writer.join()
