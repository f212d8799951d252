from django.urls import path

from console.views import (
    auth,
    catalog,
    deployments,
    invoices,
    keys,
    organization,
    overview,
    partner,
    playground,
    projects,
    publisher,
    sso,
    usage,
)

app_name = "console"

urlpatterns = [
    path("", overview.OverviewView.as_view(), name="overview"),
    path("login/", auth.LoginView.as_view(), name="login"),
    path("logout/", auth.LogoutView.as_view(), name="logout"),
    path("login/sso/", sso.SingleSignOnStartView.as_view(), name="sso-login"),
    path("login/sso/<slug:slug>/", sso.sso_begin, name="sso-begin"),
    path("login/sso/<slug:slug>/callback", sso.sso_callback, name="sso-callback"),
    path("password-reset/", auth.PasswordResetView.as_view(), name="password-reset"),
    path("password-reset/sent", auth.PasswordResetDoneView.as_view(), name="password-reset-done"),
    path(
        "password-reset/<uidb64>/<token>/",
        auth.PasswordResetConfirmView.as_view(),
        name="password-reset-confirm",
    ),
    path(
        "password-reset/complete",
        auth.PasswordResetCompleteView.as_view(),
        name="password-reset-complete",
    ),
    path("organization/switch", auth.switch_organization, name="switch-organization"),
    path("publisher/", publisher.PublisherListingsView.as_view(), name="publisher"),
    path(
        "publisher/statements/",
        publisher.PublisherStatementsView.as_view(),
        name="publisher-statements",
    ),
    path(
        "publisher/analytics/",
        publisher.PublisherAnalyticsView.as_view(),
        name="publisher-analytics",
    ),
    path("models/", catalog.ModelListView.as_view(), name="models"),
    path("models/<str:slug>/", catalog.ModelDetailView.as_view(), name="model"),
    path("models/<str:slug>/deploy", deployments.DeployView.as_view(), name="deploy"),
    path("models/<str:slug>/enable", partner.EnableModelView.as_view(), name="enable"),
    path(
        "models/<str:slug>/deploy/estimate",
        deployments.DeployEstimateView.as_view(),
        name="deploy-estimate",
    ),
    path("deployments/", deployments.DeploymentListView.as_view(), name="deployments"),
    path(
        "deployments/<uuid:deployment_id>/",
        deployments.DeploymentDetailView.as_view(),
        name="deployment",
    ),
    path(
        "deployments/<uuid:deployment_id>/scale",
        deployments.DeploymentScaleView.as_view(),
        name="deployment-scale",
    ),
    path(
        "deployments/<uuid:deployment_id>/fallbacks",
        deployments.DeploymentFallbacksView.as_view(),
        name="deployment-fallbacks",
    ),
    path(
        "deployments/<uuid:deployment_id>/delete",
        deployments.DeploymentDeleteView.as_view(),
        name="deployment-delete",
    ),
    path("playground/", playground.PlaygroundIndexView.as_view(), name="playground-index"),
    path(
        "deployments/<uuid:deployment_id>/playground",
        playground.PlaygroundView.as_view(),
        name="playground",
    ),
    path("usage/", usage.UsageView.as_view(), name="usage"),
    path("invoices/", invoices.InvoiceListView.as_view(), name="invoices"),
    path("invoices/upcoming", invoices.UpcomingInvoiceView.as_view(), name="invoice-upcoming"),
    path("invoices/<str:number>/", invoices.InvoiceDetailView.as_view(), name="invoice"),
    path("api-keys/", keys.APIKeyListView.as_view(), name="api-keys"),
    path("api-keys/<int:pk>/revoke", keys.APIKeyRevokeView.as_view(), name="api-key-revoke"),
    path("projects/", projects.ProjectListView.as_view(), name="projects"),
    path("projects/<int:project_id>/", projects.ProjectView.as_view(), name="project"),
    path(
        "projects/<int:project_id>/settings",
        projects.ProjectSettingsView.as_view(),
        name="project-settings",
    ),
    path(
        "projects/<int:project_id>/budget",
        projects.ProjectBudgetView.as_view(),
        name="project-budget",
    ),
    path(
        "projects/<int:project_id>/members",
        projects.ProjectMemberAddView.as_view(),
        name="project-members",
    ),
    path(
        "projects/<int:project_id>/members/<int:pk>",
        projects.ProjectMemberChangeView.as_view(),
        name="project-member",
    ),
    path(
        "projects/<int:project_id>/keys",
        projects.ProjectKeyCreateView.as_view(),
        name="project-key-create",
    ),
    path("settings/", organization.OrganizationSettingsView.as_view(), name="settings"),
    path(
        "settings/profile", organization.OrganizationProfileView.as_view(), name="settings-profile"
    ),
    path("settings/sso", sso.SingleSignOnSettingsView.as_view(), name="settings-sso"),
    path("settings/sso/remove", sso.SingleSignOnRemoveView.as_view(), name="settings-sso-remove"),
    path("settings/budget", organization.BudgetView.as_view(), name="settings-budget"),
    path("settings/members", organization.MemberAddView.as_view(), name="member-add"),
    path(
        "settings/members/<int:pk>/role", organization.MemberRoleView.as_view(), name="member-role"
    ),
    path(
        "settings/members/<int:pk>/remove",
        organization.MemberRemoveView.as_view(),
        name="member-remove",
    ),
]
