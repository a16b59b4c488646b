"""A loopback port that leads into one emulated host.

The hosts' addresses exist only inside their namespaces, so a client in the
machine's own namespace (a test, ``vllm bench serve``, the openai client)
cannot reach the head's API server directly.  :class:`LoopbackRelay` listens
on ``127.0.0.1`` and, for each connection, opens the upstream connection from
a thread that has entered the head's namespace (``setns`` moves only the
calling thread).  The relayed bytes stay inside the head host: they never
cross the link, so the link counters see only host-to-host traffic.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

__all__ = ["LoopbackRelay"]


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


class LoopbackRelay:
    """``127.0.0.1:port`` -> ``(address, target_port)`` inside a namespace."""

    def __init__(self, enter_namespace: Callable[[], None], address: str,
                 target_port: int) -> None:
        self._enter = enter_namespace
        self._target = (address, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name="fc2-relay-accept")
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True,
                             name="fc2-relay-conn").start()

    def _serve(self, client: socket.socket) -> None:
        # This thread joins the host's namespace for good; it ends with the
        # connection.
        try:
            self._enter()
            upstream = socket.create_connection(self._target, timeout=10)
            upstream.settimeout(None)
        except OSError:
            client.close()
            return
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()
        client.close()
        upstream.close()

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.close()
        except OSError:
            pass
