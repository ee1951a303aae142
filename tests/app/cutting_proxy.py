"""A loopback TCP proxy that cuts each response mid-stream, at a known SSE event: the dropped
connection of the remote-model tests (a real socket closing, not a mocked error)."""
from __future__ import annotations

import socket
import threading

from .serve_server import free_socket


class CuttingProxy:
    """Relays loopback connections to `upstream_port` and cuts each response just before its
    `events`+1-th SSE event: a connection dropped mid-reply, at a known point. (GET /models
    has no SSE events and passes whole.)"""

    def __init__(self, upstream_port: int, events: int):
        self.upstream_port, self.events = upstream_port, events
        self.sock = free_socket()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client):
        up = socket.create_connection(("127.0.0.1", self.upstream_port))

        def pump_up():
            try:
                while data := client.recv(65536):
                    up.sendall(data)
            except OSError:
                pass

        threading.Thread(target=pump_up, daemon=True).start()
        got = b""
        try:
            while data := up.recv(65536):
                before = len(got)
                got += data
                at, n = -1, 0
                for _ in range(self.events + 1):  # where the event after the last allowed one starts
                    at = got.find(b"data:", at + 1)
                    if at < 0:
                        break
                    n += 1
                if n > self.events:
                    client.sendall(got[before:at])
                    return
                client.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, up):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self):
        self.sock.close()
