import re

import pytest
import yaml
from openapi_spec_validator import validate

pytestmark = pytest.mark.django_db


def test_schema_is_a_valid_openapi_3_document(client):
    response = client.get("/api/schema/")
    assert response.status_code == 200
    document = yaml.safe_load(response.content)
    assert document["openapi"].startswith("3.")
    validate(document)
    assert "/api/v1/organizations/current" in document["paths"]
    assert "/api/v1/api-keys" in document["paths"]


def test_docs_page_serves_its_assets_locally(client):
    response = client.get("/api/docs/")
    assert response.status_code == 200
    html = response.content.decode()
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets
    assert not [a for a in assets if a.startswith(("http://", "https://", "//"))], assets
    for asset in assets:
        if asset.startswith("/static/"):
            assert client.get(asset).status_code == 200, asset


@pytest.fixture
def document(client):
    return client.get("/api/schema/?format=json").json()


def test_every_operation_documents_its_errors_as_problem_json(document):
    assert document["components"]["schemas"]["Problem"]["required"][:3] == [
        "type",
        "title",
        "status",
    ]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert {"401", "403", "503"} <= set(responses), (method, path)
            for code, response in responses.items():
                if code.startswith(("4", "5")):
                    content = response["content"]["application/problem+json"]
                    assert content["schema"]["$ref"] == "#/components/schemas/Problem"
            if "{" in path or any(p["name"] == "page" for p in operation.get("parameters", [])):
                assert "404" in responses, (method, path)
            if method in ("post", "patch", "delete"):
                assert "409" in responses, (method, path)
            if "requestBody" in operation:
                assert {"400", "415"} <= set(responses), (method, path)
                assert list(operation["requestBody"]["content"]) == ["application/json"]


def test_auth_schemes_and_nullable_fields_are_declared(document):
    schemes = document["components"]["securitySchemes"]
    assert schemes["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["apiKey"]["description"],
    }
    assert schemes["consoleSession"]["in"] == "cookie"
    schemas = document["components"]["schemas"]
    assert schemas["APIKey"]["properties"]["created_by"]["nullable"] is True
    for field in ("id", "number"):
        assert schemas["UpcomingInvoice"]["properties"][field]["nullable"] is True
    assert schemas["DeploymentCreateRequest"]["additionalProperties"] is False


def test_unmatched_api_paths_are_problem_json_and_console_paths_html(client):
    response = client.get("/api/v1/no-such-thing")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert (body["code"], body["status"]) == ("not_found", 404)
    assert "/api/schema/" in body["detail"] and body["request_id"] == response["X-Request-ID"]
    console = client.get("/no-such-page/")
    assert console.status_code == 404
    assert console["Content-Type"].startswith("text/html")


@pytest.mark.parametrize(
    ("query", "field"),
    [("page=0", "page"), ("page=abc", "page"), ("page_size=501", "page_size")],
)
def test_pagination_parameters_out_of_range_are_400(api, query, field):
    response = api.get(f"/api/v1/api-keys?{query}")
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == field


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"name": 7}, "name", "Must be a string."),
        ({"monthly_spend_limit": 10.5}, "monthly_spend_limit", "Send the amount as a string"),
        ({"monthly_spend_limit": ""}, "monthly_spend_limit", "Send the amount as a string"),
    ],
)
def test_json_bodies_take_the_schemas_types(api, body, field, words):
    response = api.patch("/api/v1/organizations/current", body)
    assert response.status_code == 400, response.json()
    [error] = response.json()["errors"]
    assert error["field"] == field and words in error["message"]


def test_bodies_other_than_json_are_415(api):
    response = api.patch(
        "/api/v1/organizations/current", "name=x", content_type="application/x-www-form-urlencoded"
    )
    assert response.status_code == 415
    assert response["Content-Type"] == "application/problem+json"


def test_the_docs_page_is_not_an_operation_and_refuses_options(client, document):
    assert not [path for path in document["paths"] if not path.startswith("/api/v1/")]
    assert client.options("/api/docs/").status_code == 405
