from django.urls import path

from accounts import apis

urlpatterns = [
    path(
        "organizations/current", apis.CurrentOrganizationApi.as_view(), name="organization-current"
    ),
    path("organizations/current/sso", apis.SingleSignOnApi.as_view(), name="sso"),
    path("members", apis.MemberListApi.as_view(), name="member-list"),
    path("members/<int:pk>", apis.MemberDetailApi.as_view(), name="member-detail"),
    path("api-keys", apis.APIKeyListApi.as_view(), name="api-key-list"),
    path("api-keys/<int:pk>", apis.APIKeyDetailApi.as_view(), name="api-key-detail"),
    path("audit-log", apis.AuditLogListApi.as_view(), name="audit-log"),
]

urlpatterns += [
    path("projects", apis.ProjectListApi.as_view(), name="project-list"),
    path("projects/<int:project_id>", apis.ProjectDetailApi.as_view(), name="project-detail"),
    path(
        "projects/<int:project_id>/members",
        apis.ProjectMemberListApi.as_view(),
        name="project-member-list",
    ),
    path(
        "projects/<int:project_id>/members/<int:pk>",
        apis.ProjectMemberDetailApi.as_view(),
        name="project-member-detail",
    ),
    path(
        "projects/<int:project_id>/api-keys",
        apis.ProjectAPIKeyListApi.as_view(),
        name="project-api-key-list",
    ),
]
