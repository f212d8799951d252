"""Start and stop the test identity provider process (see server.py)."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class Provider:
    issuer: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_provider(
    *, people: list[dict], clients: list[dict], code_seconds: int = 60, impostor_jwks=False
) -> Provider:
    """A running provider with these people and clients; waits until discovery answers. With
    `impostor_jwks`, its JWKS publishes a key that did not sign its ID tokens."""
    workdir = Path(tempfile.mkdtemp(prefix="sirocco-test-idp-"))
    seed = workdir / "seed.json"
    seed.write_text(json.dumps({"people": people, "clients": clients}))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    port = _free_port()
    issuer = f"http://127.0.0.1:{port}/o"
    env = {
        **{name: value for name, value in os.environ.items() if not name.startswith("DJANGO_")},
        "IDP_DATABASE": str(workdir / "idp.sqlite3"),
        "IDP_ISSUER": issuer,
        "IDP_CODE_SECONDS": str(code_seconds),
        "IDP_IMPOSTOR_JWKS": "1" if impostor_jwks else "",
        "IDP_SIGNING_KEY": key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
    }
    log_path = workdir / "idp.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.oidc_provider.server", str(seed), str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    provider = Provider(issuer=issuer, process=process, log_path=log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the test identity provider exited:\n{provider.log()}")
        try:
            if httpx.get(f"{issuer}/.well-known/openid-configuration", timeout=2).is_success:
                return provider
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    provider.stop()
    raise RuntimeError(f"the test identity provider did not start:\n{provider.log()}")
