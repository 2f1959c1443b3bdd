"""A TCP proxy whose replies a test can hold back: a slow server, on cue rather than by the clock.

Clients connect to `GatedProxy.port`; bytes to the server pass at once, and the server's replies
pass only while `open` (held while closed, then delivered in order). `drop()` cuts every
connection, as a server that dies mid-call would.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class GatedProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port`; replies wait while the gate is shut."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._gate = threading.Event()
        self._gate.set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.held_replies = 0  # reply chunks that waited at the shut gate
        threading.Thread(target=self._accept, daemon=True).start()

    def shut(self) -> None:
        """Holds the server's replies from now on."""
        self._gate.clear()

    def open(self) -> None:
        """Lets held and later replies through."""
        self._gate.set()

    def drop(self) -> None:
        """Closes every connection open now (new ones are accepted)."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            _shut(s)
            s.close()

    def close(self) -> None:
        self.open()
        self._listener.close()
        self.drop()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, gated: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if gated and not self._gate.is_set():
                    self.held_replies += 1
                    self._gate.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                _shut(s)


def _shut(s: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the other side or by `drop`
        s.shutdown(socket.SHUT_RDWR)
