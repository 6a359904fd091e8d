"""A TCP proxy that can be frozen: bytes stop flowing both ways (as with a SIGSTOPped server or a
stalled network) until it is thawed. Fault injection for one test's own connections, without
pausing a server that other tests share."""
from __future__ import annotations

import socket
import threading
import time
from typing import Self

from tests.conftest import free_port


class FreezeProxy:
    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self.running = threading.Event()
        self.flowing = threading.Event()
        self.flowing.set()
        self.server = socket.create_server(("127.0.0.1", self.port), backlog=128)
        self.server.settimeout(0.2)
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> Self:
        self.running.set()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.flowing.set()
        self.running.clear()
        self.thread.join(5)
        self.server.close()

    def freeze(self) -> None:
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    def _accept(self) -> None:
        while self.running.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self.flowing.wait()
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            client.close()
            return
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            src.settimeout(0.2)
            while self.running.is_set():
                self.flowing.wait()
                try:
                    data = src.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                while not self.flowing.is_set():  # frozen mid-message: hold it
                    time.sleep(0.05)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
