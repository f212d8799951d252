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
    if not spend_rows:
        return []
    limits = dict(
        Organization.objects.filter(
            id__in={row.organization_id for row in spend_rows},
            monthly_spend_limit__gt=0,
        ).values_list("id", "monthly_spend_limit")
    )
    candidates = []
    for row in spend_rows:
        limit = limits.get(row.organization_id)
        if limit is None:
            continue
        for threshold in BudgetAlert.THRESHOLDS:
            if row.amount * 100 >= limit * threshold:
                candidates.append(
                    BudgetAlert(
                        organization_id=row.organization_id,
                        period_start=row.period_start,
                        threshold_percent=threshold,
                        spend=round_money(row.amount, row.currency),
                        limit=limit,
                        currency=row.currency,
                    )
                )
    if not candidates:
        return []
    BudgetAlert.objects.bulk_create(candidates, ignore_conflicts=True)
    pending = list(
        BudgetAlert.objects.filter(
            organization_id__in={a.organization_id for a in candidates},
            period_start__in={a.period_start for a in candidates},
            emailed_at__isnull=True,
        ).values_list("id", flat=True)
    )
    if pending:
        from billing import tasks

        transaction.on_commit(lambda: [tasks.budget_alert_email.delay(pk) for pk in pending])
    return candidates


@transaction.atomic
def budget_alert_email(*, alert_id: int) -> bool:
    """Email one alert to the organization's billing address, once. Returns whether it sent."""
    alert = (
        BudgetAlert.objects.select_for_update()
        .select_related("organization")
        .filter(pk=alert_id, emailed_at__isnull=True)
        .first()
    )
    if alert is None:
        return False
    organization = alert.organization
    recipients = [organization.billing_email] if organization.billing_email else []
    if recipients:
        period = period_starting(alert.period_start)
        send_mail(
            subject=(
                f"[Sirocco] {organization.name} reached {alert.threshold_percent}% "
                f"of its spend limit"
            ),
            message=(
                f"{organization.name} ({organization.slug}) has spent {alert.spend} "
                f"{alert.currency} in the billing period {period.label}, "
                f"{alert.threshold_percent}% of its limit of {alert.limit} {alert.currency}.\n"
                + (
                    "Requests are refused until the period ends or the limit is raised.\n"
                    if alert.threshold_percent >= 100
                    else ""
                )
                + f"\nUsage and invoices: {settings.SIROCCO_PUBLIC_URL}/\n"
            ),
            from_email=settings.DEFAULT_FROM_EMAIL,
            recipient_list=recipients,
        )
    alert.emailed_at = timezone.now()
    alert.save(update_fields=["emailed_at"])
    return bool(recipients)


def project_budget_alerts_raise(*, spend_rows: list[ProjectPeriodSpend]) -> list:
    """The projects' side of budget_alerts_raise: each threshold once per period, emailed
    after the transaction commits."""
    if not spend_rows:
        return []
    budgets = dict(
        Project.objects.filter(
            id__in={row.project_id for row in spend_rows}, monthly_budget__gt=0
        ).values_list("id", "monthly_budget")
    )
    candidates = [
        ProjectBudgetAlert(
            project_id=row.project_id,
            period_start=row.period_start,
            threshold_percent=threshold,
            spend=round_money(row.amount, row.currency),
            limit=budgets[row.project_id],
            currency=row.currency,
        )
        for row in spend_rows
        if row.project_id in budgets
        for threshold in BudgetAlert.THRESHOLDS
        if row.amount * 100 >= budgets[row.project_id] * threshold
    ]
    if not candidates:
        return []
    ProjectBudgetAlert.objects.bulk_create(candidates, ignore_conflicts=True)
    pending = list(
        ProjectBudgetAlert.objects.filter(
            project_id__in={a.project_id for a in candidates},
            period_start__in={a.period_start for a in candidates},
            emailed_at__isnull=True,
        ).values_list("id", flat=True)
    )
    if pending:
        from billing import tasks

        transaction.on_commit(
            lambda: [tasks.project_budget_alert_email.delay(pk) for pk in pending]
        )
    return candidates


@transaction.atomic
def project_budget_alert_email(*, alert_id: int) -> bool:
    """Email one project alert to the organization's billing address, once."""
    alert = (
        ProjectBudgetAlert.objects.select_for_update()
        .select_related("project__organization")
        .filter(pk=alert_id, emailed_at__isnull=True)
        .first()
    )
    if alert is None:
        return False
    project = alert.project
    organization = project.organization
    recipients = [organization.billing_email] if organization.billing_email else []
    if recipients:
        period = period_starting(alert.period_start)
        send_mail(
            subject=(
                f"[Sirocco] Project {project.name} of {organization.name} reached "
                f"{alert.threshold_percent}% of its budget"
            ),
            message=(
                f"The project {project.name} of {organization.name} ({organization.slug}) has "
                f"spent {alert.spend} {alert.currency} in the billing period {period.label}, "
                f"{alert.threshold_percent}% of its budget of {alert.limit} {alert.currency}.\n"
                + (
                    "Its keys' requests are refused until the period ends or the budget is "
                    "raised.\n"
                    if alert.threshold_percent >= 100
                    else ""
                )
                + f"\nProjects: {settings.SIROCCO_PUBLIC_URL}/projects/\n"
            ),
            from_email=settings.DEFAULT_FROM_EMAIL,
            recipient_list=recipients,
        )
    alert.emailed_at = timezone.now()
    alert.save(update_fields=["emailed_at"])
    return bool(recipients)


def spend_percent(spend: Decimal, limit: Decimal | None) -> Decimal | None:
    if not limit:
        return None
    return (spend * 100 / limit).quantize(Decimal("0.1"))
