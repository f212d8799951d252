from django.urls import path

from console.views import auth, keys, organization, overview

app_name = "console"

urlpatterns = [
    path("", overview.OverviewView.as_view(), name="overview"),
    path("login/", auth.LoginView.as_view(), name="login"),
    path("logout/", auth.LogoutView.as_view(), name="logout"),
    path("organization/switch", auth.switch_organization, name="switch-organization"),
    path("api-keys/", keys.APIKeyListView.as_view(), name="api-keys"),
    path("api-keys/<int:pk>/revoke", keys.APIKeyRevokeView.as_view(), name="api-key-revoke"),
    path("settings/", organization.OrganizationSettingsView.as_view(), name="settings"),
    path(
        "settings/profile", organization.OrganizationProfileView.as_view(), name="settings-profile"
    ),
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
