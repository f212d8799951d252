"""The Content-Security-Policy holds on every page a browser opens: the console (every page,
with htmx polling), the login and reset pages, the admin, the API docs and the browsable API,
in a real Chromium, which reports each violation as a console error. Screenshots under
tests/artifacts/console/csp-*.png show the pages still look right."""

import re

import pytest

from accounts.roles import Role
from tests.console.conftest import screenshot
from tests.console.test_every_page import pages  # noqa: F401 - the fixture: every console page
from tests.deployments.factories import DeploymentFactory
from tests.factories import MembershipFactory, UserFactory

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]
PASSWORD = "correct horse battery staple"


def visit(page, url, problems):
    page.goto(url)  # waits for "load": every script and style has run or been refused
    page.wait_for_timeout(500)  # the scripts' first work (htmx's first swap, the playground)
    return [p for p in problems if p[0] == url]


def test_no_page_breaks_the_content_security_policy(page, live_server, organization, pages):  # noqa: F811
    user = UserFactory(email="ops@example.com", is_staff=True, is_superuser=True)
    MembershipFactory(organization=organization, user=user, role=Role.OWNER)
    problems = []
    current = {"url": ""}
    page.on(
        "console",
        lambda message: message.type == "error" and problems.append((current["url"], message.text)),
    )
    page.on("pageerror", lambda error: problems.append((current["url"], str(error))))
    failed = []
    page.on(
        "response",
        lambda response: (
            response.status >= 400
            and not response.url.endswith("/favicon.ico")  # the admin names no icon; browsers ask
            and failed.append((current["url"], response.status, response.url))
        ),
    )

    anonymous = ["/login/", "/login/sso/", "/password-reset/", "/admin/login/", "/api/docs/"]
    for path in anonymous:
        current["url"] = live_server.url + path
        visit(page, current["url"], problems)
    response = page.request.get(live_server.url + "/login/")
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy

    page.goto(live_server.url + "/login/")
    page.get_by_label("Email").fill(user.email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(live_server.url + "/")

    starting = DeploymentFactory(
        organization=organization, status="provisioning", progress_phase="loading_weights",
        progress_percent=60, priced=False,
    )  # fmt: skip
    signed_in = [
        *pages,
        f"/deployments/{starting.pk}/",  # the progress bar, and htmx polling
        "/admin/",
        f"/admin/accounts/organization/{organization.pk}/change/",
        "/admin/billing/invoice/",
        "/api/v1/models",  # DRF's browsable API
        "/api/v1/deployments",
    ]
    for path in signed_in:
        current["url"] = live_server.url + path
        visit(page, current["url"], problems)
        name = re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-") or "overview"
        if path in ("/", "/usage/", "/api-keys/", "/admin/", f"/deployments/{starting.pk}/"):
            screenshot(page, f"csp-{name[:11]}")
    violations = [(url, text) for url, text in problems if "Content Security Policy" in text]
    assert violations == [], "\n".join(f"{url}: {text}" for url, text in violations)
    assert failed == []
    # Other console errors: only the resource failures just checked (favicon.ico).
    assert [p for p in problems if "Failed to load resource" not in p[1]] == []
