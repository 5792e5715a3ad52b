"""A TCP proxy in front of a tracking server that injects a fault at an exact request.

The client talks to the proxy; the proxy forwards bytes both ways. When the
n-th request whose first line matches ``trigger`` arrives, the proxy runs
``fault`` (kill the server, restart the database, ...) *before* forwarding
it, so the phase of the job the fault hits is decided by the job's own
requests, never by a timer. After a fault that killed the server, the proxy
stops listening too: new connections are refused, as they would be by a dead
server.
"""

from __future__ import annotations

import re
import socket
import threading

from mlflow_helpers import free_port


class FaultProxy:
    def __init__(self, target_port: int, trigger: str, fault, nth: int = 1, close_after: bool = True):
        self.target_port = target_port
        self.trigger = re.compile(trigger.encode())
        self.fault = fault
        self.nth = nth
        self.close_after = close_after
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.requests: list[str] = []  # every request line seen, in order
        self.matched: list[str] = []  # those that matched, in order
        self.fired = threading.Event()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        try:
            self._listener.close()
        except OSError:
            pass
        for s in list(self._sockets):
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while True:
                chunk = source.recv(65536)
                if not chunk:
                    break
                if from_client:
                    self._maybe_fire(chunk)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _maybe_fire(self, chunk: bytes) -> None:
        first_line = chunk.split(b"\r\n", 1)[0]
        if first_line[:1].isupper() and b" HTTP/1." in first_line:
            self.requests.append(first_line.decode(errors="replace"))
        if not self.trigger.search(first_line) or self.fired.is_set():
            return
        with self._lock:
            self.matched.append(first_line.decode(errors="replace"))
            if len(self.matched) != self.nth or self.fired.is_set():
                return
            self.fault()
            self.fired.set()
            if self.close_after:
                self.close()
