"""The README's quickstart, end to end, on the real platform.

`make run`'s steps (migrate, bootstrap_demo, run_platform: uvicorn with the console, API and
gateway, plus a Celery worker with beat and the local provisioner), then in headless
Chromium: log in with the printed credentials, find Mixtral by searching "mixtral", deploy
`mixtral-tiny`, watch it become ready, chat in the playground (tokens stream in), see the
tokens on the usage page and a line on the upcoming invoice. Then the same deployment from
the README's API example: the printed key and the `openai` SDK.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.console.conftest import screenshot

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.nodb]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def platform(tmp_path):
    """`make run` on a fresh var/ folder: returns (url, printed output)."""
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if k
            not in {
                "DATABASE_URL",
                "CELERY_BROKER_URL",
                "REDIS_URL",
                "DJANGO_SETTINGS_MODULE",
                "SIROCCO_DEMO_PASSWORD",
            }
        },
        "SECRET_KEY": "journey-test-key-" + "x" * 40,
        "SIROCCO_VAR_DIR": str(tmp_path),
        "PYTHONUNBUFFERED": "1",
        "LOG_FORMAT": "text",
        "LOG_LEVEL": "WARNING",
    }
    manage = [sys.executable, "manage.py"]
    for step in (["migrate", "--noinput", "-v0"], ["bootstrap_demo"]):
        subprocess.run([*manage, *step], cwd=ROOT, env=env, check=True, timeout=600)
    port = free_port()
    log = (tmp_path / "platform.log").open("w+")
    process = subprocess.Popen(
        [*manage, "run_platform", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        output = ""
        while "Press Ctrl-C to stop" not in output:
            assert process.poll() is None, f"run_platform exited:\n{output}"
            assert time.monotonic() < deadline, f"run_platform did not start:\n{output}"
            time.sleep(0.5)
            output = (tmp_path / "platform.log").read_text()
        yield f"http://127.0.0.1:{port}", output
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_the_quickstart_from_login_to_the_upcoming_invoice(page, platform):
    url, output = platform
    # Real processes on a shared 2-core machine: a step may wait on the worker and SQLite.
    page.set_default_timeout(60_000)
    email, password = re.search(r"Login:\s+(\S+) / (\S+)", output).groups()
    api_key = re.search(r"API key:\s+(sk-\S+)", output).group(1)
    assert not password.startswith("(")  # the made-up password itself, as make run prints it

    page.goto(f"{url}/")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("link", name="Models").click()
    page.get_by_label("Search").fill("mixtral")
    page.wait_for_url(re.compile(r"q=mixtral"))
    screenshot(page, "journey-1-search")

    page.locator(".model-card a", has_text=re.compile("tiny", re.I)).click()
    page.get_by_role("link", name=re.compile(r"^Deploy ")).click()
    # The demo already calls the shared pool as `mixtral-tiny`: the form suggests a free name.
    name = page.get_by_label("Name").input_value()
    assert name.startswith("mixtral-tiny-")
    screenshot(page, "journey-2-deploy-form")
    page.get_by_role("button", name="Deploy", exact=True).click()
    page.wait_for_url(re.compile(r"/deployments/[0-9a-f-]{36}/$"))
    # The page polls the deployment until a replica of the builtin runtime answers.
    page.locator("#live .badge.ok", has_text="Ready").wait_for(timeout=240_000)
    screenshot(page, "journey-3-ready")

    page.get_by_role("link", name="Open playground").click()
    page.get_by_label("Message").fill("Say hello.")
    page.get_by_role("button", name="Send").click()
    page.locator("#chat-usage", has_text="completion tokens").wait_for(timeout=120_000)
    answer = page.locator(".msg.assistant .content").inner_text()
    assert answer.strip(), "the playground streamed an answer"
    assert page.locator(".msg.error").count() == 0
    screenshot(page, "journey-4-playground")

    # Billing ingests usage every few seconds; the page shows it once it has.
    deadline = time.monotonic() + 90
    while True:
        page.goto(f"{url}/usage/")
        if page.locator("td", has_text=name).count():
            break
        assert time.monotonic() < deadline, "the playground's tokens never reached usage"
        time.sleep(1)
    screenshot(page, "journey-5-usage")

    page.goto(f"{url}/invoices/upcoming")
    assert page.get_by_text(re.compile(r"mixtral-tiny.*input tokens")).count()
    screenshot(page, "journey-6-upcoming-invoice")

    # The README's API example, with the printed key: deploy through the REST API, wait for
    # ready, chat with the openai SDK (streaming), and find the tokens in GET /api/v1/usage.
    import httpx
    from openai import OpenAI

    api = httpx.Client(
        base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {api_key}"}, timeout=30
    )
    created = api.post(
        "/deployments",
        json={
            "name": "mixtral-api",
            "model": "mixtral-tiny",
            "type": "dedicated",
            "hardware_profile": "cpu-small",
        },
    )
    assert created.status_code == 201, created.text
    deadline = time.monotonic() + 240
    while api.get(f"/deployments/{created.json()['id']}").json()["status"] != "ready":
        assert time.monotonic() < deadline, "the API's deployment never became ready"
        time.sleep(0.5)

    client = OpenAI(base_url=f"{url}/v1", api_key=api_key)
    assert {"mixtral-tiny", name, "mixtral-api"} <= {model.id for model in client.models.list()}
    stream = client.chat.completions.create(
        model="mixtral-api",
        messages=[{"role": "user", "content": "Hello!"}],
        max_tokens=16,
        stream=True,
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces).strip()
    deadline = time.monotonic() + 90
    while True:
        rows = api.get("/usage", params={"group_by": "deployment"}).json()
        rows = rows["results"] if isinstance(rows, dict) and "results" in rows else rows
        if any(row.get("label") == "mixtral-api" for row in rows):
            break
        assert time.monotonic() < deadline, f"the SDK's tokens never reached usage: {rows}"
        time.sleep(1)
