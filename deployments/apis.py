"""REST endpoints: /api/v1/deployments (POST/GET/PATCH/DELETE) and .../{id}/events."""

import uuid

from django.http import Http404
from drf_spectacular.utils import extend_schema
from rest_framework import generics, status
from rest_framework.response import Response

from accounts.roles import Permission
from deployments import selectors, services
from deployments.filters import DeploymentEventFilter, DeploymentFilter
from deployments.models import Deployment, DeploymentEvent
from deployments.serializers import (
    DeploymentCreateSerializer,
    DeploymentEventSerializer,
    DeploymentSerializer,
    DeploymentUpdateSerializer,
)


def _deployment_or_404(request, pk) -> Deployment:
    try:
        deployment_id = uuid.UUID(str(pk))
    except ValueError:
        raise Http404 from None
    deployment = selectors.deployment_get(
        organization=request.actor.organization, deployment_id=deployment_id
    )
    if deployment is None:
        raise Http404
    return deployment


class DeploymentListApi(generics.ListAPIView):
    """Your organization's deployments. Create one with POST: the response is `pending`; poll
    the deployment (or its events) to watch it become `ready`."""

    queryset = Deployment.objects.none()  # for the OpenAPI schema: get_queryset needs a caller
    serializer_class = DeploymentSerializer
    filterset_class = DeploymentFilter
    ordering_fields = ["created_at", "name", "status"]
    required_permissions = {
        "GET": Permission.DEPLOYMENTS_READ,
        "POST": Permission.DEPLOYMENTS_WRITE,
    }

    def get_queryset(self):
        deployments = selectors.deployment_list(organization=self.request.actor.organization)
        if "status" not in self.request.query_params:
            deployments = deployments.exclude(status=Deployment.Status.DELETED)
        return deployments

    @extend_schema(request=DeploymentCreateSerializer, responses={201: DeploymentSerializer})
    def post(self, request):
        serializer = DeploymentCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        deployment = services.deployment_create(actor=request.actor, **serializer.validated_data)
        deployment = _deployment_or_404(request, deployment.pk)
        return Response(
            DeploymentSerializer(deployment, context={"request": request}).data,
            status=status.HTTP_201_CREATED,
            headers={"Location": f"/api/v1/deployments/{deployment.pk}"},
        )


class DeploymentDetailApi(generics.GenericAPIView):
    serializer_class = DeploymentSerializer
    required_permissions = {
        "GET": Permission.DEPLOYMENTS_READ,
        "PATCH": Permission.DEPLOYMENTS_WRITE,
        "DELETE": Permission.DEPLOYMENTS_WRITE,
    }

    def get(self, request, pk):
        return Response(
            DeploymentSerializer(_deployment_or_404(request, pk), context={"request": request}).data
        )

    @extend_schema(
        request=DeploymentUpdateSerializer,
        responses=DeploymentSerializer,
        description="Scale (min/max replicas, autoscaling) or roll out a new version or "
        "hardware profile. Changing a failed deployment retries it.",
    )
    def patch(self, request, pk):
        deployment = _deployment_or_404(request, pk)
        serializer = DeploymentUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        services.deployment_update(
            actor=request.actor, deployment=deployment, **serializer.validated_data
        )
        return Response(
            DeploymentSerializer(_deployment_or_404(request, pk), context={"request": request}).data
        )

    @extend_schema(
        responses={202: DeploymentSerializer},
        description="Start removing the deployment: it is `deleting` until every replica and "
        "cluster object is gone, then `deleted`.",
    )
    def delete(self, request, pk):
        deployment = _deployment_or_404(request, pk)
        services.deployment_delete(actor=request.actor, deployment=deployment)
        return Response(
            DeploymentSerializer(
                _deployment_or_404(request, pk), context={"request": request}
            ).data,
            status=status.HTTP_202_ACCEPTED,
        )


class DeploymentEventListApi(generics.ListAPIView):
    """What happened to a deployment, newest first."""

    queryset = DeploymentEvent.objects.none()  # for the OpenAPI schema: get_queryset needs a caller
    serializer_class = DeploymentEventSerializer
    filterset_class = DeploymentEventFilter
    ordering_fields = ["time"]
    required_permissions = {"GET": Permission.DEPLOYMENTS_READ}

    def get_queryset(self):
        deployment = _deployment_or_404(self.request, self.kwargs["pk"])
        return selectors.deployment_events(deployment=deployment)
