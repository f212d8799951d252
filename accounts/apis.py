from django.http import Http404
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import generics, status
from rest_framework.response import Response

from accounts import projects, selectors, services, sso
from accounts.filters import APIKeyFilter, AuditLogFilter, MembershipFilter
from accounts.models import APIKey, AuditLogEntry, Membership, Project, ProjectMembership
from accounts.roles import Permission
from accounts.serializers import (
    APIKeyCreatedSerializer,
    APIKeyCreateSerializer,
    APIKeySerializer,
    APIKeyUpdateSerializer,
    AuditLogEntrySerializer,
    MembershipCreateSerializer,
    MembershipSerializer,
    MembershipUpdateSerializer,
    OrganizationSerializer,
    OrganizationUpdateSerializer,
    ProjectAPIKeyCreateSerializer,
    ProjectCreateSerializer,
    ProjectMemberSerializer,
    ProjectSerializer,
    ProjectUpdateSerializer,
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
        fields = dict(serializer.validated_data)
        project_id = fields.pop("project", None)
        project = None
        if project_id is not None:
            project = projects.project_named_in_input(
                organization=request.actor.organization, project_id=project_id
            )
        key, secret = services.api_key_create(actor=request.actor, project=project, **fields)
        key.key = secret
        return Response(APIKeyCreatedSerializer(key).data, status=status.HTTP_201_CREATED)


class APIKeyDetailApi(generics.GenericAPIView):
    serializer_class = APIKeySerializer
    required_permissions = {
        "GET": Permission.API_KEYS_READ,
        "PATCH": Permission.ORGANIZATION_READ,
        "DELETE": Permission.API_KEYS_WRITE,
    }

    def get_object(self):
        return get_object_or_404(
            selectors.api_key_list(organization=self.request.actor.organization),
            pk=self.kwargs["pk"],
        )

    def get(self, request, pk):
        return Response(APIKeySerializer(self.get_object()).data)

    @extend_schema(
        request=APIKeyUpdateSerializer,
        responses=APIKeySerializer,
        description="Rename the key or change its allow-list (api_keys.write in the "
        "organization or the key's project). The gateway applies it within its key cache's "
        "lifetime (GATEWAY_AUTH_CACHE_SECONDS).",
    )
    def patch(self, request, pk):
        key = self.get_object()  # before the body: another tenant's is a 404
        serializer = APIKeyUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        key = projects.api_key_update(actor=request.actor, api_key=key, **serializer.validated_data)
        return Response(APIKeySerializer(key).data)

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


class ProjectListApi(generics.ListAPIView):
    """The organization's projects. Every member sees them; creating one needs
    organization.write (and billing.write for a budget)."""

    queryset = Project.objects.none()  # for the OpenAPI schema: get_queryset needs a caller
    serializer_class = ProjectSerializer
    ordering_fields = ["created_at", "name"]
    required_permissions = {
        "GET": Permission.ORGANIZATION_READ,
        "POST": Permission.ORGANIZATION_WRITE,
    }

    def get_queryset(self):
        return projects.project_list(organization=self.request.actor.organization)

    @extend_schema(request=ProjectCreateSerializer, responses={201: ProjectSerializer})
    def post(self, request):
        serializer = ProjectCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        project = projects.project_create(actor=request.actor, **serializer.validated_data)
        return Response(ProjectSerializer(project).data, status=status.HTTP_201_CREATED)


class _ProjectScoped(generics.GenericAPIView):
    """A view under projects/{project_id}: another tenant's project is a 404. Permissions
    inside the project are the services' (organization role or project role)."""

    def get_project(self):
        return projects.project_get(
            organization=self.request.actor.organization, project_id=self.kwargs["project_id"]
        )


class ProjectDetailApi(_ProjectScoped):
    serializer_class = ProjectSerializer
    required_permissions = {
        "GET": Permission.ORGANIZATION_READ,
        "PATCH": Permission.ORGANIZATION_READ,
        "DELETE": Permission.ORGANIZATION_WRITE,
    }

    def get(self, request, project_id):
        return Response(ProjectSerializer(self.get_project()).data)

    @extend_schema(
        request=ProjectUpdateSerializer,
        responses=ProjectSerializer,
        description="Change the project's name, limits or allow-list (organization.write, in "
        "the organization or the project) or its monthly budget (billing.write).",
    )
    def patch(self, request, project_id):
        project = self.get_project()  # another tenant's is a 404 before the body is read
        serializer = ProjectUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        project = projects.project_update(
            actor=request.actor, project=project, **serializer.validated_data
        )
        return Response(ProjectSerializer(project).data)

    @extend_schema(
        responses={204: None},
        description="Delete a project without live keys or deployments (not the default one).",
    )
    def delete(self, request, project_id):
        projects.project_delete(actor=request.actor, project=self.get_project())
        return Response(status=status.HTTP_204_NO_CONTENT)


class ProjectMemberListApi(_ProjectScoped, generics.ListAPIView):
    queryset = ProjectMembership.objects.none()
    serializer_class = ProjectMemberSerializer
    required_permissions = {"GET": Permission.MEMBERS_READ, "POST": Permission.ORGANIZATION_READ}

    def get_queryset(self):
        return projects.project_member_list(project=self.get_project())

    @extend_schema(
        request=MembershipCreateSerializer,
        responses={201: ProjectMemberSerializer},
        description="Give a member of the organization a role in this project.",
    )
    def post(self, request, project_id):
        project = self.get_project()
        serializer = MembershipCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        member = projects.project_member_add(
            actor=request.actor, project=project, **serializer.validated_data
        )
        return Response(ProjectMemberSerializer(member).data, status=status.HTTP_201_CREATED)


class ProjectMemberDetailApi(_ProjectScoped):
    serializer_class = ProjectMemberSerializer
    required_permissions = {
        "GET": Permission.MEMBERS_READ,
        "PATCH": Permission.ORGANIZATION_READ,
        "DELETE": Permission.ORGANIZATION_READ,
    }

    def get_object(self):
        return get_object_or_404(
            projects.project_member_list(project=self.get_project()), pk=self.kwargs["pk"]
        )

    def get(self, request, project_id, pk):
        return Response(ProjectMemberSerializer(self.get_object()).data)

    @extend_schema(request=MembershipUpdateSerializer, responses=ProjectMemberSerializer)
    def patch(self, request, project_id, pk):
        member = self.get_object()  # before the body: another tenant's is a 404
        serializer = MembershipUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        member = projects.project_member_update(
            actor=request.actor, member=member, role=serializer.validated_data["role"]
        )
        return Response(ProjectMemberSerializer(member).data)

    def delete(self, request, project_id, pk):
        projects.project_member_remove(actor=request.actor, member=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)


class ProjectAPIKeyListApi(_ProjectScoped, generics.ListAPIView):
    """The project's keys; organization members with api_keys.read, or project members whose
    project role grants it."""

    queryset = APIKey.objects.none()
    serializer_class = APIKeySerializer
    filterset_class = APIKeyFilter
    ordering_fields = ["created_at", "name", "last_used_at"]
    required_permissions = {
        "GET": Permission.ORGANIZATION_READ,
        "POST": Permission.ORGANIZATION_READ,
    }

    def get_queryset(self):
        project = self.get_project()
        projects.require_in_project(self.request.actor, project, Permission.API_KEYS_READ)
        return projects.project_api_key_list(project=project)

    @extend_schema(request=ProjectAPIKeyCreateSerializer, responses={201: APIKeyCreatedSerializer})
    def post(self, request, project_id):
        project = self.get_project()
        serializer = ProjectAPIKeyCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        key, secret = services.api_key_create(
            actor=request.actor, project=project, **serializer.validated_data
        )
        key.key = secret
        return Response(APIKeyCreatedSerializer(key).data, status=status.HTTP_201_CREATED)
