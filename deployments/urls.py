from django.urls import path

from deployments import apis

urlpatterns = [
    path("deployments", apis.DeploymentListApi.as_view(), name="deployment-list"),
    path("deployments/<str:pk>", apis.DeploymentDetailApi.as_view(), name="deployment-detail"),
    path(
        "deployments/<str:pk>/events",
        apis.DeploymentEventListApi.as_view(),
        name="deployment-events",
    ),
]
