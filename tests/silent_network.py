"""A TCP proxy whose network can go silent: what a server sees of a client that went out of
coverage, or whose NAT forgot it. Bytes stop moving both ways and nothing is closed: no FIN, no
RST, so only an unanswered PING can tell the server the client is gone."""

from __future__ import annotations

import select
import socket
import threading


class SilentNetworkProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._silences: list[threading.Event] = []  # one per connection
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def go_silent(self) -> None:
        """The connections open now go silent; later ones pass (a device that roamed, and whose
        new connection takes another path)."""
        for silence in list(self._silences):
            silence.set()

    def close(self) -> None:
        self.listener.close()
        for s in self._sockets:
            s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, upstream]
            silence = threading.Event()
            self._silences.append(silence)
            self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream, silence), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, silence: threading.Event) -> None:
        peer = {a: b, b: a}
        while not silence.is_set():
            try:
                ready, _, _ = select.select([a, b], [], [], 0.05)
                for s in ready:
                    if silence.is_set():
                        return
                    data = s.recv(65536)
                    if not data:
                        return
                    peer[s].sendall(data)
            except (OSError, ValueError):  # closed by close(): select() refuses a closed socket
                return
        # Silent: the sockets stay open, and whatever is sent to them is neither read nor answered.
