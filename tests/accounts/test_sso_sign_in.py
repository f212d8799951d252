"""What a verified sign-in does (accounts.sso.sso_sign_in), rule by rule. The claims are what
accounts/oidc.py hands over after checking the ID token (the whole flow, against a real
provider in Chromium: tests/console/test_browser_sso.py)."""

import pytest

from accounts.actors import Actor
from accounts.models import AuditLogEntry, Membership, SingleSignOnConfiguration, User
from accounts.roles import Role
from accounts.services import member_add, member_remove
from accounts.sso import SignInRefused, sso_required_for, sso_sign_in
from controlplane.secrets_at_rest import encrypt
from tests.factories import MembershipFactory, OrganizationFactory, UserFactory

pytestmark = pytest.mark.django_db
ISSUER = "https://idp.acme.example"


@pytest.fixture
def configuration(organization):
    return SingleSignOnConfiguration.objects.create(
        organization=organization,
        enabled=True,
        issuer=ISSUER,
        client_id="sirocco",
        client_secret_encrypted=encrypt("s"),
        allowed_email_domains=["acme.example"],
        default_role=Role.DEVELOPER,
    )


def claims(sub="1", email="ana@acme.example", **more):
    return {"sub": sub, "email": email, "email_verified": True, **more}


def test_a_new_person_is_provisioned_with_the_default_role(configuration, organization):
    user = sso_sign_in(configuration=configuration, claims=claims(name="Ana Lima"))
    assert user.full_name == "Ana Lima" and not user.has_usable_password()
    assert Membership.objects.get(user=user, organization=organization).role == Role.DEVELOPER
    assert set(
        AuditLogEntry.objects.filter(organization=organization).values_list("action", flat=True)
    ) == {"sso.identity_link", "member.add"}


def test_the_subject_not_the_email_says_who_it_is(configuration):
    ana = sso_sign_in(configuration=configuration, claims=claims())
    # The provider renamed her: same subject, new address; still her, not a new person.
    again = sso_sign_in(configuration=configuration, claims=claims(email="ana.lima@acme.example"))
    assert again == ana
    # Her old address handed to someone else (another subject): refused, not her account.
    with pytest.raises(SignInRefused) as refused:
        sso_sign_in(configuration=configuration, claims=claims(sub="2"))
    assert refused.value.reason == "email_taken"


def test_an_existing_member_is_linked_and_keeps_their_role(configuration, organization):
    ana = UserFactory(email="ana@acme.example")
    MembershipFactory(organization=organization, user=ana, role=Role.ADMIN)
    assert sso_sign_in(configuration=configuration, claims=claims()) == ana
    assert Membership.objects.get(user=ana).role == Role.ADMIN


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        (claims(email="ana@evil.example"), "domain_not_allowed"),
        (claims(email="ana@sub.acme.example"), "domain_not_allowed"),
        (claims(email_verified=False), "email_unverified"),
        (claims(email=""), "no_email"),
        (claims(sub=""), "no_subject"),
    ],
)
def test_refusals(configuration, given, reason):
    with pytest.raises(SignInRefused) as refused:
        sso_sign_in(configuration=configuration, claims=given)
    assert refused.value.reason == reason
    assert not User.objects.exists()


def test_a_deactivated_account_is_refused(configuration):
    UserFactory(email="ana@acme.example", is_active=False)
    with pytest.raises(SignInRefused) as refused:
        sso_sign_in(configuration=configuration, claims=claims())
    assert refused.value.reason == "inactive"


def test_password_login_is_refused_only_when_it_could_reach_nothing(configuration, organization):
    configuration.password_login_enabled = False
    configuration.save()
    ana = UserFactory(email="ana@acme.example")
    MembershipFactory(organization=organization, user=ana)
    assert sso_required_for(email="ANA@acme.example ") == configuration
    # A member of another organization too still logs in with a password (for that one).
    MembershipFactory(organization=OrganizationFactory(), user=ana)
    assert sso_required_for(email=ana.email) is None
    # Nobody else is affected by the domain: the domain claim is not proof of anything.
    bruno = UserFactory(email="bruno@acme.example")
    MembershipFactory(organization=OrganizationFactory(), user=bruno)
    assert sso_required_for(email=bruno.email) is None
    assert sso_required_for(email="nobody@acme.example") is None


def test_a_person_cannot_switch_passwords_off_from_a_password_session(configuration, owner):
    from accounts.sso import sso_configure
    from controlplane.errors import ValidationFailed

    actor = Actor(organization=configuration.organization, role=Role.OWNER, user=owner)
    with pytest.raises(ValidationFailed) as refused:
        sso_configure(actor=actor, password_login_enabled=False)
    assert refused.value.field == "password_login_enabled"
    through_sso = Actor(
        organization=configuration.organization,
        role=Role.OWNER,
        user=owner,
        signed_in_through_sso=True,
    )
    configuration.enabled = False  # no discovery needed for this check: off stays refused
    configuration.save()
    with pytest.raises(ValidationFailed, match="only while single sign-on is enabled"):
        sso_configure(actor=through_sso, password_login_enabled=False)


def test_a_removed_member_is_not_provisioned_again_until_added_back(configuration, organization):
    """Removing a member must hold: their domain still allows single sign-on, yet their next
    sign-in is refused until an admin adds them back."""
    owner = Actor(organization=organization, role=Role.OWNER)
    ana = sso_sign_in(configuration=configuration, claims=claims())
    member_remove(actor=owner, membership=Membership.objects.get(user=ana))
    with pytest.raises(SignInRefused) as refused:
        sso_sign_in(configuration=configuration, claims=claims())
    assert refused.value.reason == "removed"
    assert not Membership.objects.filter(user=ana, organization=organization).exists()
    # A member who never used single sign-on, removed: their first sign-in is refused too.
    carl = member_add(actor=owner, email="carl@acme.example", role=Role.DEVELOPER)
    member_remove(actor=owner, membership=carl)
    with pytest.raises(SignInRefused) as refused:
        sso_sign_in(configuration=configuration, claims=claims(sub="9", email="carl@acme.example"))
    assert refused.value.reason == "removed"
    # Someone who was never removed still joins just in time.
    assert sso_sign_in(configuration=configuration, claims=claims(sub="3", email="bo@acme.example"))

    member_add(actor=owner, email="ana@acme.example", role=Role.VIEWER)
    assert sso_sign_in(configuration=configuration, claims=claims()) == ana
    assert Membership.objects.get(user=ana, organization=organization).role == Role.VIEWER
