"""Cost attribution: project, user and tags go from the usage event into the ledger; usage
grouped by each equals the ledger (and the reconciliation says so); projects have their own
period spend, budget alerts and gateway position; invoices break down per project."""

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.core import mail
from django.utils import timezone

from accounts.actors import Actor
from accounts.models import Project
from accounts.projects import project_create
from billing.attribution import invoice_projects, ledger_groups
from billing.invoicing import billing_period_close
from billing.ledger import usage_events_ingest
from billing.models import ProjectBudgetAlert, ProjectPeriodSpend, UsageRecord
from billing.periods import period_containing
from billing.reconcile import reconcile_period
from billing.selectors import project_spend_position
from billing.usage import usage_report
from metering.models import UsageTag
from tests.billing.conftest import NOW, at
from tests.billing.factories import UsageEventFactory

pytestmark = pytest.mark.django_db

FEB = at(2026, 2, 1)


@pytest.fixture
def search(organization):
    return project_create(actor=Actor.system(organization), name="search")


def default_project(organization) -> Project:
    return organization.projects.get(is_default=True)


def use(organization, version, *, project, dollars=1, when=NOW, **fields):
    """`dollars` x 2M input tokens at $0.50 per 1M."""
    for _ in range(dollars):
        UsageEventFactory(
            organization=organization,
            model_version_id=version.pk,
            prompt_tokens=2_000_000,
            completion_tokens=0,
            finished_at=when,
            project_id=project.pk if project else None,
            **fields,
        )


def test_events_carry_project_user_and_tags_into_the_ledger(organization, version, price, search):
    use(organization, version, project=search, end_user="u1", tags={"team": "ads"})
    use(organization, version, project=None)  # written before projects existed
    usage_events_ingest(now=NOW)
    rows = sorted(
        UsageRecord.objects.values_list("project_id", "end_user", "tags", "amount"),
        key=str,
    )
    assert rows == sorted(
        [
            (search.pk, "u1", {"team": "ads"}, Decimal("1.0000000000000000")),
            (None, None, None, Decimal("1.0000000000000000")),
        ],
        key=str,
    )
    spend = ProjectPeriodSpend.objects.get(project=search)
    assert spend.amount == Decimal("1")
    # Ingesting again changes nothing (the events are ingested; the ledger is unique).
    usage_events_ingest(now=NOW)
    assert ProjectPeriodSpend.objects.get(project=search).amount == Decimal("1")


def test_usage_grouped_by_project_user_and_tag_equals_the_ledger(
    organization, version, price, search
):
    default = default_project(organization)
    use(organization, version, project=search, dollars=2, end_user="u1", tags={"team": "ads"})
    use(organization, version, project=default, end_user="u2", tags={"team": "core", "env": "p"})
    use(organization, version, project=None, dollars=3)
    usage_events_ingest(now=NOW)
    day = NOW.date()
    ledger = sum(UsageRecord.objects.values_list("amount", flat=True), Decimal(0))
    assert ledger == Decimal(6)

    def report(group_by, tag_key=None):
        rows = usage_report(
            organization=organization, start=day, end=day, group_by=group_by, tag_key=tag_key
        )
        assert sum(r.amount for r in rows) == ledger
        assert sum(r.requests for r in rows) == 6
        return {r.key: (r.label, r.requests, r.amount) for r in rows}

    assert report("project") == {
        str(search.pk): ("search", 2, Decimal(2)),
        str(default.pk): ("Default", 4, Decimal(4)),  # the old rows are the default's
    }
    assert report("user") == {
        "u1": ("u1", 2, Decimal(2)),
        "u2": ("u2", 1, Decimal(1)),
        None: ("no user", 3, Decimal(3)),
    }
    assert report("tag", "team") == {
        "ads": ("ads", 2, Decimal(2)),
        "core": ("core", 1, Decimal(1)),
        None: ("untagged", 3, Decimal(3)),
    }
    assert report("tag", "env")["p"][1:] == (1, Decimal(1))


def test_the_reconciliation_checks_the_groupings_and_invoices_break_down_per_project(
    organization, version, price, search, api
):
    feb = datetime(2026, 2, 10, tzinfo=UTC)
    use(organization, version, project=search, dollars=2, when=feb, tags={"team": "ads"})
    use(organization, version, project=None, when=feb, end_user="u9")
    UsageTag.objects.create(organization=organization, key="team", value="ads")
    usage_events_ingest(now=NOW)
    [invoice] = billing_period_close(period_start=FEB, now=NOW).created
    shares = {share.name: share.amount for share in invoice_projects(invoice=invoice)}
    assert shares == {"search": Decimal("2.00"), "Default": Decimal("1.00")}
    assert sum(shares.values()) == invoice.subtotal
    listed = api.get(f"/api/v1/invoices/{invoice.pk}").json()["projects"]
    assert [(p["name"], p["amount"], p["requests"]) for p in listed] == [
        ("search", "2.00", 2),
        ("Default", "1.00", 1),
    ]
    period = period_containing(FEB)
    assert reconcile_period(period, check_stripe=False).differences == []
    # A grouping that lost a request is a difference the reconciliation prints.
    groups = ledger_groups(organization_id=organization.pk, dimension="project", period_start=FEB)
    assert sum(g.requests for g in groups.values()) == 3


def test_project_alerts_and_the_gateways_position(
    organization, version, price, search, django_capture_on_commit_callbacks
):
    search.monthly_budget = Decimal("4.00")
    search.save()
    with django_capture_on_commit_callbacks(execute=True):
        use(organization, version, project=search, dollars=2)
        use(organization, version, project=None, dollars=5)  # not the project's
        usage_events_ingest(now=NOW)
    assert list(ProjectBudgetAlert.objects.values_list("threshold_percent", flat=True)) == [50]
    assert len(mail.outbox) == 1 and "Project search" in mail.outbox[0].subject
    with django_capture_on_commit_callbacks(execute=True):
        use(organization, version, project=search, dollars=2)
        usage_events_ingest(now=NOW)
    assert sorted(ProjectBudgetAlert.objects.values_list("threshold_percent", flat=True)) == [
        50,
        80,
        100,
    ]
    assert "refused" in mail.outbox[-1].body or "refused" in mail.outbox[-2].body
    use(organization, version, project=search)  # not ingested yet: counted too
    position = project_spend_position(project_id=search.pk, now=NOW)
    assert (position.limit, position.spend, position.currency) == (
        Decimal("4.00"),
        Decimal(5),
        "USD",
    )
    assert project_spend_position(project_id=10**9, now=NOW) is None


def test_usage_api_groups_by_project_and_tag(organization, version, price, search, api):
    use(organization, version, project=search, tags={"team": "ads"})
    usage_events_ingest(now=NOW)
    day = NOW.date().isoformat()
    base = f"/api/v1/usage?start={day}&end={day}"
    rows = api.get(f"{base}&group_by=project").json()["results"]
    assert [(r["project"], r["label"], r["amount"]) for r in rows] == [
        (str(search.pk), "search", "1.000000")
    ]
    rows = api.get(f"{base}&group_by=tag&tag=team").json()["results"]
    assert [(r["tag"], r["requests"]) for r in rows] == [("ads", 1)]
    missing = api.get(f"{base}&group_by=tag")
    assert missing.status_code == 400 and "tag" in str(missing.json())
    bad = api.get(f"{base}&group_by=tag&tag=no%20spaces")
    assert bad.status_code == 400
    stray = api.get(f"{base}&group_by=day&tag=team")
    assert stray.status_code == 400


def test_the_budget_endpoint_shows_this_periods_spend_and_alerts(
    organization, version, price, search, api
):
    search.monthly_budget = Decimal("2.00")
    search.save()
    now = timezone.now()
    use(organization, version, project=search, dollars=2, when=now)
    usage_events_ingest(now=now)
    budget = api.get(f"/api/v1/projects/{search.pk}/budget").json()
    assert (budget["monthly_budget"], budget["spend"], budget["percent"]) == (
        "2.00",
        "2.000000",
        "100.0",
    )
    assert [a["threshold_percent"] for a in budget["alerts"]] == [100, 80, 50]
