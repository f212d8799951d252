"""A TCP proxy on loopback that a test can cut and restore: a network fault in front of
PostgreSQL, Redis or any TCP service, with real sockets.

    with FaultProxy("127.0.0.1", 5432) as proxy:
        url = f"postgres://postgres@127.0.0.1:{proxy.port}/test"   # point the process under test here
        ...
        proxy.cut()            # existing connections reset, new ones refused
        proxy.cut("blackhole") # or: connections accepted (and existing ones kept) but nothing flows
        proxy.restore()        # new connections reach the upstream again

How a cut looks to a client, by mode:
- "refuse": existing connections are reset (RST, as when the server's host dies and comes back);
  the listening socket is closed, so a new connect gets ECONNREFUSED, as for a stopped server.
- "reset": existing connections are reset; new ones are accepted and reset at once.
- "blackhole": nothing is closed and nothing is answered; bytes in either direction are dropped, so
  a client waits for its own timeout, as behind a partition. Connections that lived through a
  blackhole are reset at `restore()` (their streams lost bytes and cannot be trusted).

The proxy is a real socket server on threads of the test process: one accept thread and two pump
threads per connection. It is bounded: it stops by itself after `lifetime` seconds (a test that
forgets to stop it cannot leave it behind), and `stop()` joins every thread it started. The
listening port stays the same across cut and restore, so the process under test never needs a
new address; it is taken below the kernel's ephemeral range, so no outgoing connection can occupy
it while a "refuse" cut has it closed.

Run as `python -m tests.faultproxy UPSTREAM_HOST:PORT` for a proxy in a process of its own: it
prints its port, then reads commands on stdin (`cut [MODE]`, `restore`, `stop`).
"""

from __future__ import annotations

import contextlib
import errno
import random
import socket
import struct
import sys
import threading
import time

MODES = ("refuse", "reset", "blackhole")


def _reset(sock: socket.socket, *, pumped: bool = False) -> None:
    """Close with RST (SO_LINGER on, timeout 0): the peer sees the connection die.

    For a `pumped` socket, one a pump thread may be blocked in recv() on, a shutdown comes
    first: a bare close() would not wake that thread, and the kernel would keep the connection
    open (idle, as if nothing happened) until the next byte arrived. Its peer may then see a
    FIN just before the RST; either way its next read or write fails."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if pumped:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


class _Connection:
    """One proxied client connection and its upstream: two pump threads, one per direction."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket):
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.blackholed = False
        self.closed = threading.Event()
        self.threads = [
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True),
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while not self.closed.is_set():
                data = source.recv(65536)
                if not data:
                    break
                if self.proxy.mode == "blackhole" or self.blackholed:
                    self.blackholed = True  # a dropped byte poisons the stream for good
                    continue
                target.sendall(data)
        except OSError:
            pass
        self.close(reset=False)

    def close(self, *, reset: bool) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.upstream):
            if reset:
                _reset(sock, pumped=True)
            else:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
        self.proxy._forget(self)

    def join(self, timeout: float) -> None:
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join(timeout)


class FaultProxy:
    """A loopback TCP proxy to `upstream_host:upstream_port` that can be cut and restored."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        lifetime: float = 600.0,
        connect_timeout: float = 5.0,
    ):
        self.upstream = (upstream_host, upstream_port)
        self.lifetime = lifetime
        self.connect_timeout = connect_timeout
        self.mode: str | None = None  # None: passing traffic; else the cut's mode
        self.port = 0
        self.accepted = 0  # connections accepted since start, for tests that want to see traffic
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._held: list[socket.socket] = []  # accepted during a blackhole, never answered
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._timer: threading.Timer | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._listener = self._bind()
        self.port = self._listener.getsockname()[1]
        self._start_accepting()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        """Close everything and join the threads. Idempotent; also runs at `lifetime`."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.cancel()
        self._close_listener()
        with self._lock:
            connections = list(self._connections)
            held, self._held = self._held, []
        for connection in connections:
            connection.close(reset=True)
            connection.join(timeout=5)
        for sock in held:
            _reset(sock)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def active_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    # -- faults ----------------------------------------------------------------------------------

    def cut(self, mode: str = "refuse") -> None:
        """Start a fault (see the module docstring for what each mode looks like)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if self._stopped.is_set():
            raise RuntimeError("the proxy has stopped")
        self.mode = mode
        if mode == "blackhole":
            return
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.close(reset=True)
        if mode == "refuse":
            self._close_listener()

    def restore(self) -> None:
        """End the fault: new connections reach the upstream again."""
        if self._stopped.is_set():
            raise RuntimeError("the proxy has stopped")
        previous, self.mode = self.mode, None
        with self._lock:
            held, self._held = self._held, []
            poisoned = [c for c in self._connections if c.blackholed]
        for sock in held:
            _reset(sock)
        for connection in poisoned:
            connection.close(reset=True)
        if previous == "refuse":
            self._listener = self._bind(self.port)
            self._start_accepting()

    # -- internals -------------------------------------------------------------------------------

    def _bind(self, port: int | None = None) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if port is not None:
            # The port was ours a moment ago and lies below the ephemeral range: retry briefly
            # in case the kernel has not let go of it yet.
            deadline = time.monotonic() + 5
            while True:
                try:
                    listener.bind(("127.0.0.1", port))
                    break
                except OSError as error:
                    if error.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                        listener.close()
                        raise
                    time.sleep(0.05)
        else:
            high = max(_ephemeral_low() - 1, 2048)
            for _attempt in range(200):
                try:
                    listener.bind(("127.0.0.1", random.randint(min(20000, high - 1000), high)))
                    break
                except OSError:
                    continue
            else:
                listener.close()
                raise OSError("no free port below the ephemeral range")
        listener.listen(128)
        listener.settimeout(0.2)  # lets the accept thread notice a stop or a cut
        return listener

    def _start_accepting(self) -> None:
        listener = self._listener
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(listener,), name="faultproxy-accept", daemon=True
        )
        self._accept_thread.start()

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        thread = self._accept_thread
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.close()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopped.is_set() and self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by a cut or a stop
            client.settimeout(None)
            self.accepted += 1
            mode = self.mode
            if mode == "reset":
                _reset(client)
                continue
            if mode == "blackhole":
                with self._lock:
                    self._held.append(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=self.connect_timeout)
            except OSError:
                _reset(client)  # the upstream itself is down: the client sees that
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(self, client, upstream)
            with self._lock:
                self._connections.add(connection)
            connection.start()

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)


def main(argv: list[str]) -> int:
    host, _, port = argv[0].rpartition(":")
    proxy = FaultProxy(host or "127.0.0.1", int(port), lifetime=float(argv[1]) if argv[1:] else 600)
    proxy.start()
    print(proxy.port, flush=True)
    try:
        for line in sys.stdin:
            command, *args = line.split()
            if command == "cut":
                proxy.cut(*args)
            elif command == "restore":
                proxy.restore()
            elif command == "stop":
                break
            print("ok", flush=True)
    finally:
        proxy.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
