from django.http import Http404

from accounts.roles import Permission
from billing import selectors as billing_selectors
from billing.attribution import invoice_projects
from billing.invoicing import invoice_draft
from console.views.base import ConsoleView


class InvoiceMixin:
    section = "invoices"
    list_url_name = "console:invoices"
    required_permissions = {"GET": Permission.BILLING_READ}

    def get_invoice(self, number):
        invoice = (
            billing_selectors.invoice_list(organization=self.request.actor.organization)
            .filter(number=number)
            .first()
        )
        if invoice is None:
            raise Http404("No such invoice in your organization.")
        return invoice


class InvoiceListView(InvoiceMixin, ConsoleView):
    def get(self, request):
        organization = request.actor.organization
        return self.render(
            "console/invoices/list.html",
            {
                "upcoming": invoice_draft(organization=organization),
                "invoices": billing_selectors.invoice_list(organization=organization),
            },
        )


class UpcomingInvoiceView(InvoiceMixin, ConsoleView):
    """The current period's invoice as it stands: billing's live draft."""

    def get(self, request):
        draft = invoice_draft(organization=request.actor.organization)
        return self.render("console/invoices/upcoming.html", {"draft": draft})


class InvoiceDetailView(InvoiceMixin, ConsoleView):
    def get(self, request, number):
        invoice = self.get_invoice(number)
        return self.render(
            "console/invoices/detail.html",
            {
                "invoice": invoice,
                "lines": invoice.lines.all(),
                "projects": invoice_projects(invoice=invoice),
            },
        )
