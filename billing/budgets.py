"""Budgets: an organization's monthly spend limit (Organization.monthly_spend_limit), and each
project's monthly budget (Project.monthly_budget).

Soft alerts at 50, 80 and 100 % of the limit, once per billing period each: a BudgetAlert row
(the console shows the latest as a banner) and an email to the billing address. The hard limit
is enforced by the gateway (gateway/budget.py) from billing.selectors.organization_spend_position.
A project's budget works the same way: ProjectBudgetAlert rows at the same thresholds, an email
to the organization's billing address, and the gateway's hold against
billing.selectors.project_spend_position in the same step as the organization's.
"""

from decimal import Decimal

from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.utils import timezone

from accounts.models import Organization, Project
from billing.models import BudgetAlert, PeriodSpend, ProjectBudgetAlert, ProjectPeriodSpend
from billing.money import round_money
from billing.periods import period_starting


def budget_alerts_raise(*, spend_rows: list[PeriodSpend]) -> list[BudgetAlert]:
    """Record the thresholds these spend rows crossed (each once per period) and email them
    after the transaction commits. Runs inside the ingestion transaction."""
    limits = dict(
        Organization.objects.filter(
            id__in={row.organization_id for row in spend_rows}, monthly_spend_limit__gt=0
        ).values_list("id", "monthly_spend_limit")
    )
    return _raise(BudgetAlert, "organization_id", limits, spend_rows, "budget_alert_email")


def project_budget_alerts_raise(*, spend_rows: list[ProjectPeriodSpend]) -> list:
    """The projects' side of budget_alerts_raise."""
    budgets = dict(
        Project.objects.filter(
            id__in={row.project_id for row in spend_rows}, monthly_budget__gt=0
        ).values_list("id", "monthly_budget")
    )
    return _raise(
        ProjectBudgetAlert, "project_id", budgets, spend_rows, "project_budget_alert_email"
    )


def _raise(alert_model, owner: str, limits: dict, spend_rows: list, email_task: str) -> list:
    """An alert row for each threshold a spend row crossed against its owner's limit (the
    unique constraint keeps one per owner, period and threshold), emailed after the
    transaction commits unless it was already."""
    candidates = [
        alert_model(
            **{owner: getattr(row, owner)},
            period_start=row.period_start,
            threshold_percent=threshold,
            spend=round_money(row.amount, row.currency),
            limit=limits[getattr(row, owner)],
            currency=row.currency,
        )
        for row in spend_rows
        if getattr(row, owner) in limits
        for threshold in BudgetAlert.THRESHOLDS
        if row.amount * 100 >= limits[getattr(row, owner)] * threshold
    ]
    if not candidates:
        return []
    alert_model.objects.bulk_create(candidates, ignore_conflicts=True)
    pending = list(
        alert_model.objects.filter(
            **{f"{owner}__in": {getattr(a, owner) for a in candidates}},
            period_start__in={a.period_start for a in candidates},
            emailed_at__isnull=True,
        ).values_list("id", flat=True)
    )
    if pending:
        from billing import tasks

        task = getattr(tasks, email_task)
        transaction.on_commit(lambda: [task.delay(pk) for pk in pending])
    return candidates


@transaction.atomic
def budget_alert_email(*, alert_id: int) -> bool:
    """Email one alert to the organization's billing address, once. Returns whether it sent."""

    def compose(alert):
        organization = alert.organization
        subject = (
            f"[Sirocco] {organization.name} reached {alert.threshold_percent}% of its spend limit"
        )
        body = _alert_body(
            alert,
            f"{organization.name} ({organization.slug})",
            "limit",
            "Requests are refused until the period ends or the limit is raised.",
            f"Usage and invoices: {settings.SIROCCO_PUBLIC_URL}/",
        )
        return organization, subject, body

    return _email_once(BudgetAlert, alert_id, "organization", compose)


@transaction.atomic
def project_budget_alert_email(*, alert_id: int) -> bool:
    """Email one project alert to the organization's billing address, once."""

    def compose(alert):
        project = alert.project
        organization = project.organization
        subject = (
            f"[Sirocco] Project {project.name} of {organization.name} reached "
            f"{alert.threshold_percent}% of its budget"
        )
        body = _alert_body(
            alert,
            f"The project {project.name} of {organization.name} ({organization.slug})",
            "budget",
            "Its keys' requests are refused until the period ends or the budget is raised.",
            f"Projects: {settings.SIROCCO_PUBLIC_URL}/projects/",
        )
        return organization, subject, body

    return _email_once(ProjectBudgetAlert, alert_id, "project__organization", compose)


def _email_once(alert_model, alert_id: int, related: str, compose) -> bool:
    """Send an alert not yet emailed to its organization's billing address (if it has one)
    and mark it emailed, under a row lock: once, however many workers run the task."""
    alert = (
        alert_model.objects.select_for_update()
        .select_related(related)
        .filter(pk=alert_id, emailed_at__isnull=True)
        .first()
    )
    if alert is None:
        return False
    organization, subject, body = compose(alert)
    recipients = [organization.billing_email] if organization.billing_email else []
    if recipients:
        send_mail(
            subject=subject,
            message=body,
            from_email=settings.DEFAULT_FROM_EMAIL,
            recipient_list=recipients,
        )
    alert.emailed_at = timezone.now()
    alert.save(update_fields=["emailed_at"])
    return bool(recipients)


def _alert_body(alert, spender: str, limit_name: str, refused: str, link: str) -> str:
    """An alert email's text: what was spent, of which limit, what is refused at 100 %."""
    return (
        f"{spender} has spent {alert.spend} {alert.currency} in the billing period "
        f"{_period(alert)}, {alert.threshold_percent}% of its {limit_name} of {alert.limit} "
        f"{alert.currency}.\n"
        + (f"{refused}\n" if alert.threshold_percent >= 100 else "")
        + f"\n{link}\n"
    )


def _period(alert) -> str:
    return period_starting(alert.period_start).label


def spend_percent(spend: Decimal, limit: Decimal | None) -> Decimal | None:
    if not limit:
        return None
    return (spend * 100 / limit).quantize(Decimal("0.1"))
