from django.http import Http404
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import generics, status
from rest_framework.response import Response

from accounts import selectors, services, sso
from accounts.filters import APIKeyFilter, AuditLogFilter, MembershipFilter
from accounts.models import APIKey, AuditLogEntry, Membership
from accounts.roles import Permission
from accounts.serializers import (
    APIKeyCreatedSerializer,
    APIKeyCreateSerializer,
    APIKeySerializer,
    AuditLogEntrySerializer,
    MembershipCreateSerializer,
    MembershipSerializer,
    MembershipUpdateSerializer,
    OrganizationSerializer,
    OrganizationUpdateSerializer,
    SingleSignOnSerializer,
    SingleSignOnWriteSerializer,
)


class CurrentOrganizationApi(generics.GenericAPIView):
    """The organization the caller acts for (the key's, or the session's)."""

    serializer_class = OrganizationSerializer
    required_permissions = {
        "GET": Permission.ORGANIZATION_READ,
        "PATCH": Permission.ORGANIZATION_READ,
    }

    def get(self, request):
        return Response(OrganizationSerializer(request.actor.organization).data)

    @extend_schema(request=OrganizationUpdateSerializer, responses=OrganizationSerializer)
    def patch(self, request):
        serializer = OrganizationUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        organization = services.organization_update(
            actor=request.actor,
            organization=request.actor.organization,
            **serializer.validated_data,
        )
        return Response(OrganizationSerializer(organization).data)


class MemberListApi(generics.ListAPIView):
    queryset = Membership.objects.none()  # for the OpenAPI schema: get_queryset needs a caller
    serializer_class = MembershipSerializer
    filterset_class = MembershipFilter
    ordering_fields = ["created_at", "role"]
    required_permissions = {"GET": Permission.MEMBERS_READ, "POST": Permission.MEMBERS_WRITE}

    def get_queryset(self):
        return selectors.membership_list(organization=self.request.actor.organization)

    @extend_schema(request=MembershipCreateSerializer, responses={201: MembershipSerializer})
    def post(self, request):
        serializer = MembershipCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        membership = services.member_add(actor=request.actor, **serializer.validated_data)
        return Response(MembershipSerializer(membership).data, status=status.HTTP_201_CREATED)


class MemberDetailApi(generics.GenericAPIView):
    serializer_class = MembershipSerializer
    required_permissions = {
        "GET": Permission.MEMBERS_READ,
        "PATCH": Permission.MEMBERS_WRITE,
        "DELETE": Permission.MEMBERS_WRITE,
    }

    def get_object(self):
        return get_object_or_404(
            selectors.membership_list(organization=self.request.actor.organization),
            pk=self.kwargs["pk"],
        )

    def get(self, request, pk):
        return Response(MembershipSerializer(self.get_object()).data)

    @extend_schema(request=MembershipUpdateSerializer, responses=MembershipSerializer)
    def patch(self, request, pk):
        membership = self.get_object()
        serializer = MembershipUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        membership = services.member_update_role(
            actor=request.actor, membership=membership, role=serializer.validated_data["role"]
        )
        return Response(MembershipSerializer(membership).data)

    def delete(self, request, pk):
        services.member_remove(actor=request.actor, membership=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)


class APIKeyListApi(generics.ListAPIView):
    queryset = APIKey.objects.none()  # for the OpenAPI schema: get_queryset needs a caller
    serializer_class = APIKeySerializer
    filterset_class = APIKeyFilter
    ordering_fields = ["created_at", "name", "last_used_at"]
    required_permissions = {"GET": Permission.API_KEYS_READ, "POST": Permission.API_KEYS_WRITE}

    def get_queryset(self):
        return selectors.api_key_list(organization=self.request.actor.organization)

    @extend_schema(request=APIKeyCreateSerializer, responses={201: APIKeyCreatedSerializer})
    def post(self, request):
        serializer = APIKeyCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        key, secret = services.api_key_create(actor=request.actor, **serializer.validated_data)
        key.key = secret
        return Response(APIKeyCreatedSerializer(key).data, status=status.HTTP_201_CREATED)


class APIKeyDetailApi(generics.GenericAPIView):
    serializer_class = APIKeySerializer
    required_permissions = {"GET": Permission.API_KEYS_READ, "DELETE": Permission.API_KEYS_WRITE}

    def get_object(self):
        return get_object_or_404(
            selectors.api_key_list(organization=self.request.actor.organization),
            pk=self.kwargs["pk"],
        )

    def get(self, request, pk):
        return Response(APIKeySerializer(self.get_object()).data)

    @extend_schema(responses={204: None}, description="Revoke the key. It stops working at once.")
    def delete(self, request, pk):
        services.api_key_revoke(actor=request.actor, api_key=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)


class AuditLogListApi(generics.ListAPIView):
    queryset = AuditLogEntry.objects.none()  # for the OpenAPI schema: get_queryset needs a caller
    serializer_class = AuditLogEntrySerializer
    filterset_class = AuditLogFilter
    ordering_fields = ["created_at"]
    required_permissions = {"GET": Permission.AUDIT_READ}

    def get_queryset(self):
        return selectors.audit_log_list(organization=self.request.actor.organization)


_NOT_CONFIGURED = OpenApiResponse(description="This organization has no single sign-on yet.")


class SingleSignOnApi(generics.GenericAPIView):
    """The organization's single sign-on (OpenID Connect). Owners change it; owners and admins
    read it. The client secret is write-only: no response carries it."""

    serializer_class = SingleSignOnSerializer
    required_permissions = {
        "GET": Permission.SSO_READ,
        "PUT": Permission.SSO_WRITE,
        "PATCH": Permission.SSO_WRITE,
        "DELETE": Permission.SSO_WRITE,
    }

    def get_object(self):
        configuration = sso.sso_configuration_for(organization=self.request.actor.organization)
        if configuration is None:
            raise Http404("This organization has no single sign-on configured.")
        return configuration

    @extend_schema(responses={200: SingleSignOnSerializer, 404: _NOT_CONFIGURED})
    def get(self, request):
        return Response(SingleSignOnSerializer(self.get_object()).data)

    @extend_schema(
        request=SingleSignOnWriteSerializer,
        responses=SingleSignOnSerializer,
        description="Configure single sign-on (the first time: issuer, client id, client secret "
        "and allowed email domains). Enabling it reads the provider's discovery document.",
    )
    def put(self, request):
        return self._write(request, partial=False)

    @extend_schema(
        request=SingleSignOnWriteSerializer,
        responses=SingleSignOnSerializer,
        description="Change some settings; the client secret only when given.",
    )
    def patch(self, request):
        return self._write(request, partial=True)

    @extend_schema(
        responses={204: None, 404: _NOT_CONFIGURED},
        description="Remove single sign-on: members sign in with passwords again.",
    )
    def delete(self, request):
        sso.sso_remove(actor=request.actor)
        return Response(status=status.HTTP_204_NO_CONTENT)

    def _write(self, request, *, partial: bool):
        serializer = SingleSignOnWriteSerializer(data=request.data, partial=partial)
        serializer.is_valid(raise_exception=True)
        configuration = sso.sso_configure(actor=request.actor, **serializer.validated_data)
        return Response(SingleSignOnSerializer(configuration).data)
