"""``/api/openapi.json``: a valid OpenAPI 3 document describing every route as it behaves."""

import copy
import json

import pytest
import schemathesis
from django.urls import URLPattern, reverse

from tasksignal import openapi
from tasksignal import urls as api_urls

pytestmark = pytest.mark.django_db

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture
def document(client) -> dict:
    """The document as the API serves it, fetched without credentials."""
    response = client.get("/api/openapi.json")
    assert response.status_code == 200, f"the document is not served: {response.content[:300]!r}"
    assert response["Content-Type"] == "application/json", response.headers
    return json.loads(response.content)


def api_routes() -> dict[str, URLPattern]:
    """The API's routes as OpenAPI path templates, without the catch-all 404."""
    routes = {}
    for pattern in api_urls.urlpatterns:
        if pattern.name == "not-found":
            continue
        kwargs = {"task_id": "TASKID"} if "task_id" in str(pattern.pattern) else {}
        url = reverse(f"tasksignal:{pattern.name}", kwargs=kwargs).replace("TASKID", "{task_id}")
        routes[url] = pattern
    return routes


def test_the_document_is_public_and_validates_as_openapi_3(document):
    assert document["openapi"].startswith("3."), document["openapi"]
    schemathesis.openapi.from_dict(document).validate()  # raises on any schema error


def test_the_validation_used_above_does_reject_a_broken_document(document):
    broken = copy.deepcopy(document)
    broken["paths"]["/api/tasks/"]["post"]["responses"] = "not a responses object"
    with pytest.raises(Exception, match="responses"):
        schemathesis.openapi.from_dict(broken).validate()


def test_the_document_lists_every_route_with_exactly_the_methods_its_view_answers(document):
    documented = {
        (path, method.upper())
        for path, item in document["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }
    served = {
        (path, method)
        for path, pattern in api_routes().items()
        for method in pattern.callback.api_methods
    }
    assert documented == served, (
        f"documented but not served: {sorted(documented - served)}; "
        f"served but not documented: {sorted(served - documented)}"
    )


def test_each_operation_documents_the_permission_its_view_checks(document):
    for path, pattern in api_routes().items():
        for method in pattern.callback.api_methods:
            operation = document["paths"][path][method.lower()]
            permission = pattern.callback.api_permission
            if permission is None:
                assert operation.get("security") == [], f"{method} {path} is public: say so"
                continue
            assert "security" not in operation, f"{method} {path} must use the global security"
            assert permission in operation["description"], (
                f"{method} {path} checks {permission} but its description does not say so"
            )
            for status in ("401", "403"):
                assert status in operation["responses"], f"{method} {path} lacks {status}"


def test_the_document_declares_bearer_authentication(document):
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["bearerAuth"]["description"],
    }, schemes
    assert {"bearerAuth": []} in document["security"], document["security"]


def test_the_document_is_built_once_per_process():
    assert openapi.document_bytes() is openapi.document_bytes(), "rebuilt on every request"


def test_the_served_document_is_the_built_one(document):
    assert document == openapi.build_document(), "the fuzz test would test another document"
