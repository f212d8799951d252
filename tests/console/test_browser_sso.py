"""Single sign-on end to end: headless Chromium, the console on a live server, and a real OpenID
Connect provider process on loopback (django-oauth-toolkit, tests/oidc_provider). The browser
signs in at the provider's own login page; nothing of the protocol is simulated."""

import re
import time
from html import escape
from urllib.parse import unquote, urljoin

import pytest
from axes.models import AccessAttempt
from playwright.sync_api import expect

from accounts.actors import Actor
from accounts.models import AuditLogEntry, Membership, SingleSignOnIdentity, User
from accounts.roles import Role
from accounts.sso import sso_configure
from tests.conftest import IDP_CLIENT_ID, IDP_CLIENT_SECRET, IDP_PEOPLE
from tests.console.conftest import screenshot
from tests.console.test_browser_foundation import PASSWORD, log_in
from tests.factories import MembershipFactory, OrganizationFactory, UserFactory
from tests.oidc_provider.process import start_provider

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]
SLUGS = ["acme", "initech"]
IDP_PASSWORDS = {person["username"]: person["password"] for person in IDP_PEOPLE}


def _provider(live_server, *, code_seconds, impostor_jwks=False):
    return start_provider(
        impostor_jwks=impostor_jwks,
        people=IDP_PEOPLE,
        clients=[
            {
                "client_id": IDP_CLIENT_ID,
                "client_secret": IDP_CLIENT_SECRET,
                "redirect_uris": [f"{live_server.url}/login/sso/{slug}/callback" for slug in SLUGS],
            }
        ],
        code_seconds=code_seconds,
    )


@pytest.fixture(scope="module")
def provider(live_server):
    running = _provider(live_server, code_seconds=60)
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _sso_settings(settings, live_server):
    settings.SSO_ALLOW_HTTP_ISSUERS = True
    settings.SIROCCO_PUBLIC_URL = live_server.url


def acme_with_sso(provider, *, slug="acme", **fields):
    organization = OrganizationFactory(slug=slug, name=slug.capitalize())
    sso_configure(
        actor=Actor.system(organization),
        issuer=provider.issuer,
        client_id=IDP_CLIENT_ID,
        client_secret=IDP_CLIENT_SECRET,
        allowed_email_domains=["acme.example"],
        default_role=Role.DEVELOPER,
        enabled=True,
        **fields,
    )
    return organization


def sign_in_at_the_provider(page, username):
    expect(page.get_by_role("heading", name="Test IdP")).to_be_visible()
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(IDP_PASSWORDS[username])
    page.get_by_role("button", name="Sign in at the IdP").click()


def start_by_email(page, live_server, email):
    page.goto(f"{live_server.url}/login/")
    page.get_by_role("link", name="Sign in with SSO").click()
    page.get_by_label("Work email or organization").fill(email)
    page.get_by_role("button", name="Continue").click()
    page.get_by_role("link", name=re.compile("Continue to")).click()


def hold_the_callback(page, slug="acme"):
    """Stop the browser before the provider's redirect back to us lands; returns the list that
    redirect's URL goes into (its code and state unused until the test says so).

    Playwright routes only the first request of a redirect chain, so each redirect is taken
    here (the cookies it sets land in the browser context's jar) and the browser is sent on
    with a fresh navigation, which is routed again; the redirect to our callback is kept.
    """
    held = []

    def follow(route):
        if not route.request.is_navigation_request():
            route.continue_()
            return
        response = route.fetch(max_redirects=0)
        if response.status not in (301, 302, 303, 307, 308):
            route.fulfill(response=response)
            return
        location = urljoin(response.url, response.headers["location"])
        if f"/login/sso/{slug}/callback" in location:
            held.append(location)
            route.fulfill(status=200, body="held by the test", content_type="text/plain")
            return
        route.fulfill(
            status=200,
            content_type="text/html",
            body=f'<meta http-equiv="refresh" content="0;url={escape(location)}">',
        )

    page.route("**/*", follow)
    return held


def release(page):
    page.unroute("**/*")


def test_sign_in_with_sso_provisions_the_person_just_in_time(page, live_server, provider):
    organization = acme_with_sso(provider)
    page.goto(f"{live_server.url}/login/")
    screenshot(page, "sso-login-page")
    page.get_by_role("link", name="Sign in with SSO").click()
    page.get_by_label("Work email or organization").fill("ana@acme.example")
    screenshot(page, "sso-start")
    page.get_by_role("button", name="Continue").click()
    expect(page.get_by_role("heading", name="Sign in to Acme")).to_be_visible()
    screenshot(page, "sso-continue")
    page.get_by_role("link", name=re.compile("Continue to 127.0.0.1")).click()
    expect(page.get_by_role("heading", name="Test IdP")).to_be_visible()
    authorization = unquote(unquote(page.url))  # its login page, then its authorization
    assert authorization.startswith(provider.issuer.removesuffix("/o"))
    assert "code_challenge_method=S256" in authorization and "nonce=" in authorization
    assert "login_hint=ana@acme.example" in authorization
    screenshot(page, "sso-provider-login")
    sign_in_at_the_provider(page, "ana")
    page.wait_for_url(f"{live_server.url}/")
    expect(page.get_by_role("heading", name="Acme", exact=True)).to_be_visible()
    screenshot(page, "sso-signed-in")

    user = User.objects.get(email="ana@acme.example")
    assert not user.has_usable_password()
    assert Membership.objects.get(user=user, organization=organization).role == Role.DEVELOPER
    identity = SingleSignOnIdentity.objects.get(user=user, organization=organization)
    assert identity.issuer == provider.issuer and identity.last_sign_in_at is not None
    actions = set(
        AuditLogEntry.objects.filter(organization=organization, actor_user=user).values_list(
            "action", flat=True
        )
    )
    assert actions == {"sso.identity_link", "member.add"}

    # Again, by the organization's link: the provider remembers the person, nothing new is made.
    page.get_by_role("button", name="Log out").click()
    page.goto(f"{live_server.url}/login/sso/acme/")
    page.wait_for_url(f"{live_server.url}/")
    assert User.objects.filter(email="ana@acme.example").count() == 1
    assert Membership.objects.filter(user=user).count() == 1
    assert SingleSignOnIdentity.objects.filter(user=user).count() == 1


def test_a_wrong_state_is_refused_and_the_right_one_still_works(page, live_server, provider):
    acme_with_sso(provider)
    held = hold_the_callback(page)
    start_by_email(page, live_server, "ana@acme.example")
    sign_in_at_the_provider(page, "ana")
    expect(page.get_by_text("held by the test")).to_be_visible()
    release(page)
    callback = held[0]
    state = re.search(r"state=([^&]+)", callback).group(1)

    response = page.goto(callback.replace(f"state={state}", "state=forged-by-an-attacker"))
    assert response.status == 400
    expect(page.get_by_role("heading", name="Single sign-on failed")).to_be_visible()
    assert page.get_by_role("alert").get_attribute("data-reason") == "state_mismatch"
    screenshot(page, "sso-wrong-state")
    assert page.goto(f"{live_server.url}/").url.startswith(f"{live_server.url}/login/")

    response = page.goto(callback.replace("state=", "nostate="))  # no state at all
    assert response.status == 400

    page.goto(callback)  # the genuine answer, in the browser that started it
    page.wait_for_url(f"{live_server.url}/")
    assert User.objects.filter(email="ana@acme.example").exists()


def test_a_replayed_code_is_refused_by_the_provider(page, live_server, provider):
    acme_with_sso(provider)
    seen = []
    page.on(
        "request",
        lambda request: seen.append(request.url) if "/callback?" in request.url else None,
    )
    start_by_email(page, live_server, "ana@acme.example")
    sign_in_at_the_provider(page, "ana")
    page.wait_for_url(f"{live_server.url}/")
    used_code = re.search(r"code=([^&]+)", seen[0]).group(1)
    page.get_by_role("button", name="Log out").click()

    # The same page replayed: its state was used up with the sign-in.
    assert page.goto(seen[0]).status == 400
    assert page.get_by_role("alert").get_attribute("data-reason") == "state_mismatch"

    # A fresh state of this browser with the old code: the provider refuses the code.
    held = hold_the_callback(page)
    page.goto(f"{live_server.url}/login/sso/acme/")  # the provider still knows ana: no form
    expect(page.get_by_text("held by the test")).to_be_visible()
    release(page)
    fresh_code = re.search(r"code=([^&]+)", held[0]).group(1)
    response = page.goto(held[0].replace(fresh_code, used_code))
    assert response.status == 400
    alert = page.get_by_role("alert")
    assert alert.get_attribute("data-reason") == "token_rejected"
    assert "invalid_grant" in alert.inner_text()
    screenshot(page, "sso-replayed-code")
    assert page.goto(f"{live_server.url}/").url.startswith(f"{live_server.url}/login/")


def test_an_expired_code_is_refused(page, live_server):
    hasty = _provider(live_server, code_seconds=1)  # codes live one second at this provider
    try:
        acme_with_sso(hasty, slug="initech")
        held = hold_the_callback(page, slug="initech")
        page.goto(f"{live_server.url}/login/sso/initech/")
        sign_in_at_the_provider(page, "ana")
        expect(page.get_by_text("held by the test")).to_be_visible()
        release(page)
        time.sleep(2.5)
        response = page.goto(held[0])
        assert response.status == 400
        alert = page.get_by_role("alert")
        assert alert.get_attribute("data-reason") == "token_rejected"
        assert "invalid_grant" in alert.inner_text()
        screenshot(page, "sso-expired-code")
        assert not User.objects.filter(email="ana@acme.example").exists()
    finally:
        hasty.stop()


def test_an_id_token_the_published_keys_did_not_sign_is_refused(page, live_server):
    impostor = _provider(live_server, code_seconds=60, impostor_jwks=True)
    try:
        acme_with_sso(impostor, slug="initech")
        page.goto(f"{live_server.url}/login/sso/initech/")
        sign_in_at_the_provider(page, "ana")
        expect(page.get_by_role("heading", name="Single sign-on failed")).to_be_visible()
        alert = page.get_by_role("alert")
        assert alert.get_attribute("data-reason") == "token_rejected"
        assert "bad_signature" in alert.inner_text()
        assert not User.objects.filter(email="ana@acme.example").exists()
    finally:
        impostor.stop()


@pytest.mark.parametrize(
    ("username", "reason", "words"),
    [
        ("mallory", "domain_not_allowed", "mallory@evil.example is not in a domain"),
        ("ursula", "email_unverified", "has not verified ursula@acme.example"),
    ],
)
def test_a_person_outside_the_rules_is_refused(
    page, live_server, provider, username, reason, words
):
    organization = acme_with_sso(provider)
    page.goto(f"{live_server.url}/login/sso/acme/")
    sign_in_at_the_provider(page, username)
    expect(page.get_by_role("heading", name="Single sign-on failed")).to_be_visible()
    alert = page.get_by_role("alert")
    assert alert.get_attribute("data-reason") == reason
    assert words in alert.inner_text()
    screenshot(page, f"sso-refused-{reason}")
    assert not Membership.objects.filter(organization=organization).exists()
    assert not User.objects.filter(email__startswith=username).exists()
    assert page.goto(f"{live_server.url}/").url.startswith(f"{live_server.url}/login/")


def test_with_password_login_off_only_sso_gets_in(page, live_server, provider):
    organization = acme_with_sso(provider, password_login_enabled=False)
    ana = UserFactory(email="ana@acme.example")
    MembershipFactory(organization=organization, user=ana, role=Role.ADMIN)

    page.goto(f"{live_server.url}/login/")
    page.get_by_label("Email").fill("ana@acme.example")
    page.get_by_label("Password").fill(PASSWORD)  # her right password, refused all the same
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_contain_text("Acme signs in through single sign-on only")
    screenshot(page, "sso-password-login-off")
    assert page.url.startswith(f"{live_server.url}/login/")
    assert not AccessAttempt.objects.exists()  # not a failure toward her lockout

    page.get_by_role("link", name="Sign in to Acme with SSO").click()
    sign_in_at_the_provider(page, "ana")
    page.wait_for_url(f"{live_server.url}/")
    # The existing person, linked; her role kept.
    assert SingleSignOnIdentity.objects.get(organization=organization).user == ana
    assert Membership.objects.get(user=ana).role == Role.ADMIN


def test_password_sessions_lose_an_organization_that_requires_sso(page, live_server, provider):
    organization = acme_with_sso(provider, password_login_enabled=False)
    other = OrganizationFactory(name="Globex")
    bruno = UserFactory(email="bruno@acme.example")
    MembershipFactory(organization=organization, user=bruno, role=Role.OWNER)
    MembershipFactory(organization=other, user=bruno, role=Role.OWNER)

    log_in(page, live_server, bruno.email)  # allowed: Globex takes passwords
    switcher = page.get_by_label("Organization", exact=True)
    options = switcher.locator("option").all_inner_texts() if switcher.count() else []
    assert "Acme" not in " ".join(options)
    assert page.evaluate("fetch('/api/v1/organizations/current').then(r => r.json())")["name"] == (
        "Globex"
    )

    # Through Acme's provider: this session acts for Acme, and for nothing else.
    page.get_by_role("button", name="Log out").click()
    page.goto(f"{live_server.url}/login/sso/acme/")
    sign_in_at_the_provider(page, "bruno")
    page.wait_for_url(f"{live_server.url}/")
    current = page.evaluate("fetch('/api/v1/organizations/current').then(r => r.json())")
    assert current["name"] == "Acme"
    screenshot(page, "sso-session-one-organization")


def test_a_locked_out_account_still_signs_in_through_sso(page, live_server, provider, settings):
    settings.AXES_FAILURE_LIMIT = 2
    organization = acme_with_sso(provider)
    ana = UserFactory(email="ana@acme.example")
    MembershipFactory(organization=organization, user=ana, role=Role.VIEWER)
    page.goto(f"{live_server.url}/login/")
    for attempt in range(2):
        page.get_by_label("Email").fill(ana.email)
        page.get_by_label("Password").fill(f"guess {attempt}")
        page.get_by_role("button", name="Log in").click()
        page.wait_for_load_state()
    expect(page.get_by_role("heading", name="Too many failed logins")).to_be_visible()

    # The provider vouches for her: password guessing against the account does not keep her
    # out, and her success clears the count as a password success would.
    page.goto(f"{live_server.url}/login/sso/acme/")
    sign_in_at_the_provider(page, "ana")
    page.wait_for_url(f"{live_server.url}/")
    assert not AccessAttempt.objects.filter(username=ana.email).exists()


def test_an_owner_configures_sso_in_the_console(page, live_server, provider):
    organization = OrganizationFactory(slug="acme", name="Acme")
    owner = UserFactory(email="ana@acme.example")
    MembershipFactory(organization=organization, user=owner, role=Role.OWNER)
    log_in(page, live_server, owner.email)
    page.goto(f"{live_server.url}/settings/")
    page.get_by_role("link", name="Single sign-on").click()
    expect(page.get_by_role("heading", name="Single sign-on", exact=True)).to_be_visible()
    assert page.locator("#redirect-uri").inner_text() == (
        f"{live_server.url}/login/sso/acme/callback"
    )
    page.get_by_label("Issuer").fill(provider.issuer)
    page.get_by_label("Client ID").fill(IDP_CLIENT_ID)
    page.get_by_label("Client secret").fill(IDP_CLIENT_SECRET)
    page.get_by_label("Allowed email domains").fill("acme.example, eu.acme.example")
    page.get_by_label("Role of new members").select_option("developer")
    page.get_by_label("Enable single sign-on").check()
    page.get_by_role("button", name="Save single sign-on").click()
    expect(page.get_by_text("Saved single sign-on.")).to_be_visible()
    expect(page.get_by_text("stored, encrypted")).to_be_visible()
    assert IDP_CLIENT_SECRET not in page.content()
    assert page.get_by_label("Client secret").input_value() == ""
    screenshot(page, "sso-settings")

    # From a password session, switching passwords off is refused: it would lock her out now.
    page.get_by_label("Members may also sign in with a password").uncheck()
    page.get_by_role("button", name="Save single sign-on").click()
    expect(page.get_by_text("Sign in with single sign-on first")).to_be_visible()
    screenshot(page, "sso-settings-sign-in-first")

    # Through single sign-on, she may; she keeps the organization, and the secret is kept.
    page.get_by_role("button", name="Log out").click()
    page.goto(f"{live_server.url}/login/sso/acme/?next=/settings/sso")
    sign_in_at_the_provider(page, "ana")
    page.wait_for_url(f"{live_server.url}/settings/sso")
    page.get_by_label("Members may also sign in with a password").uncheck()
    page.get_by_role("button", name="Save single sign-on").click()
    expect(page.get_by_text("Saved single sign-on.")).to_be_visible()
    configuration = organization.sso_configuration
    configuration.refresh_from_db()
    assert configuration.enforced
    assert configuration.client_secret_encrypted
    assert AuditLogEntry.objects.filter(action="sso.update", actor_user=owner).exists()

    # A wrong issuer is refused beside its field, nothing typed is lost.
    page.get_by_label("Issuer").fill(provider.issuer + "/nope")
    page.get_by_role("button", name="Save single sign-on").click()
    expect(page.get_by_text("Could not read the provider's discovery document")).to_be_visible()
    assert page.get_by_label("Issuer").input_value() == provider.issuer + "/nope"
    screenshot(page, "sso-settings-error")


def test_admins_read_sso_settings_and_developers_do_not_see_them(page, live_server, provider):
    organization = acme_with_sso(provider)
    admin = UserFactory(email="admin@acme.example")
    MembershipFactory(organization=organization, user=admin, role=Role.ADMIN)
    log_in(page, live_server, admin.email)
    page.goto(f"{live_server.url}/settings/sso")
    expect(page.get_by_text("Only owners change single sign-on.")).to_be_visible()
    assert page.get_by_role("button", name="Save single sign-on").count() == 0
    assert IDP_CLIENT_SECRET not in page.content()

    developer = UserFactory(email="dev@acme.example")
    MembershipFactory(organization=organization, user=developer, role=Role.DEVELOPER)
    page.get_by_role("button", name="Log out").click()
    log_in(page, live_server, developer.email)
    page.goto(f"{live_server.url}/settings/")
    assert page.get_by_role("link", name="Single sign-on").count() == 0
    assert page.goto(f"{live_server.url}/settings/sso").status == 403
