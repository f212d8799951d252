"""The fault proxy itself: traffic passes, each cut mode looks as documented to a client, restore
brings traffic back on the same port, and the proxy stops by itself."""

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.faultproxy import FaultProxy


@pytest.fixture
def echo_server():
    """A loopback echo server, bounded: it stops when the test ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=lambda c=conn: _ignore_oserror(serve, c), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()
    stop.set()
    thread.join(5)
    listener.close()


def _ignore_oserror(fn, *args):
    with contextlib.suppress(OSError):
        fn(*args)


def roundtrip(address, payload=b"ping", timeout=2.0):
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(payload)
        return sock.recv(100)


@pytest.mark.nodb
def test_traffic_passes_and_a_refuse_cut_resets_and_refuses(echo_server):
    with FaultProxy(*echo_server) as proxy:
        assert roundtrip(proxy.address) == b"ping"
        live = socket.create_connection(proxy.address, timeout=2)
        live.sendall(b"a")
        assert live.recv(10) == b"a"

        idle = socket.create_connection(proxy.address, timeout=2)
        idle.sendall(b"i")
        assert idle.recv(10) == b"i"

        proxy.cut()
        # An idle connection learns at once, without sending anything first.
        with pytest.raises(ConnectionResetError):
            assert idle.recv(10) == b""  # end of stream (FIN before the RST) counts too
            raise ConnectionResetError
        idle.close()
        with pytest.raises(OSError):  # reset, or end of stream then broken pipe
            live.sendall(b"b")
            assert live.recv(10) != b"b"
            live.sendall(b"c" * 100000)
        live.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(proxy.address, timeout=2)

        proxy.restore()
        assert roundtrip(proxy.address) == b"ping", "same port, traffic again"


@pytest.mark.nodb
def test_reset_cut_accepts_then_resets(echo_server):
    with FaultProxy(*echo_server) as proxy:
        proxy.cut("reset")
        # On connect, on send or on receive, depending on timing.
        with pytest.raises(OSError), socket.create_connection(proxy.address, timeout=2) as sock:
            time.sleep(0.1)
            sock.sendall(b"x")
            assert sock.recv(10) == b""
            raise ConnectionResetError  # end of stream counts as a cut too
        proxy.restore()
        assert roundtrip(proxy.address) == b"ping"


@pytest.mark.nodb
def test_blackhole_cut_answers_nothing_and_restore_drops_the_poisoned_streams(echo_server):
    with FaultProxy(*echo_server) as proxy:
        live = socket.create_connection(proxy.address, timeout=0.5)
        live.sendall(b"a")
        assert live.recv(10) == b"a"

        proxy.cut("blackhole")
        live.sendall(b"lost")
        with pytest.raises(TimeoutError):
            live.recv(10)
        with pytest.raises(TimeoutError):
            roundtrip(proxy.address, timeout=0.5)  # connects, then silence

        proxy.restore()
        live.settimeout(2)
        with pytest.raises(OSError):
            live.sendall(b"b")
            assert live.recv(10) == b""
            raise ConnectionResetError
        live.close()
        assert roundtrip(proxy.address) == b"ping"


@pytest.mark.nodb
def test_upstream_down_looks_like_a_reset_and_the_proxy_stops_by_itself():
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        dead = placeholder.getsockname()
    proxy = FaultProxy(*dead, lifetime=0.5).start()
    # Nothing from a dead upstream.
    with pytest.raises(ConnectionResetError), socket.create_connection(proxy.address) as sock:
        sock.recv(10)
    time.sleep(1.0)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proxy.address, timeout=2)
    assert not [t for t in threading.enumerate() if t.name == "faultproxy-accept"]


@pytest.mark.nodb
def test_as_a_process_driven_over_stdin(echo_server):
    host, port = echo_server
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.faultproxy", f"{host}:{port}", "60"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        proxy_port = int(process.stdout.readline())
        assert roundtrip(("127.0.0.1", proxy_port)) == b"ping"
        process.stdin.write("cut refuse\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "ok"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy_port), timeout=2)
        process.stdin.write("restore\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "ok"
        assert roundtrip(("127.0.0.1", proxy_port)) == b"ping"
        process.stdin.write("stop\n")
        process.stdin.flush()
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# Not nodb: this one runs in the PostgreSQL pass, and is skipped in the SQLite pass.
@pytest.mark.skipif(
    not os.environ.get("DATABASE_URL", "").startswith("postgres"), reason="needs PostgreSQL"
)
def test_in_front_of_postgresql():
    import psycopg

    url = os.environ["DATABASE_URL"]
    upstream = psycopg.conninfo.conninfo_to_dict(url)
    with FaultProxy(upstream.get("host", "127.0.0.1"), int(upstream.get("port", 5432))) as proxy:
        through = psycopg.conninfo.make_conninfo(
            url, host="127.0.0.1", port=proxy.port, connect_timeout=2
        )
        with psycopg.connect(through) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
            proxy.cut()
            with pytest.raises(psycopg.OperationalError):
                conn.execute("select 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(through)
        proxy.restore()
        with psycopg.connect(through) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
