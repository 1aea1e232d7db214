"""``/api/openapi.json``: a valid OpenAPI 3 document, generated from the views, that says
what every operation needs and answers."""

import copy
import json

import pytest
import schemathesis

from tasksignal.api import openapi_document

pytestmark = pytest.mark.django_db

ERRORS_EVERY_OPERATION_DOCUMENTS = {"400", "401", "403", "404", "503"}


@pytest.fixture
def document(client) -> dict:
    """The document as the API serves it, fetched without credentials."""
    response = client.get("/api/openapi.json")
    assert response.status_code == 200, f"the document is not served: {response.content[:300]!r}"
    assert response["Content-Type"].startswith("application/json"), response.headers
    return json.loads(response.content)


def operations(document: dict):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield f"{method.upper()} {path}", operation


def test_the_document_is_public_and_validates_as_openapi_3(document):
    assert document["openapi"].startswith("3."), document["openapi"]
    schemathesis.openapi.from_dict(document).validate()  # raises on any schema error


def test_the_validation_used_above_does_reject_a_broken_document(document):
    broken = copy.deepcopy(document)
    broken["paths"]["/api/tasks/"]["post"]["responses"] = "not a responses object"
    with pytest.raises(Exception, match="responses"):
        schemathesis.openapi.from_dict(broken).validate()


def test_every_operation_documents_its_errors_and_its_credentials(document):
    for name, operation in operations(document):
        missing = ERRORS_EVERY_OPERATION_DOCUMENTS - set(operation["responses"])
        assert not missing, f"{name} does not document {sorted(missing)}"
        assert operation.get("security") == [{"TokenOrSession": []}], f"{name}: {operation}"
        assert "Permission: ``tasksignal." in operation["description"], (
            f"{name} does not say which permission it needs"
        )


def test_the_bearer_scheme_is_declared(document):
    scheme = document["components"]["securitySchemes"]["TokenOrSession"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer"), scheme


@pytest.mark.parametrize(
    ("method", "path"), [("post", "/api/tasks/{task_id}/cancel/"), ("get", "/api/tasks/{task_id}/")]
)
def test_waiting_for_a_stop_is_documented(document, method, path):
    parameters = {p["name"]: p for p in document["paths"][path][method]["parameters"]}
    assert "wait" in parameters, f"{method.upper()} {path} does not document ?wait"
    assert parameters["wait"]["in"] == "query", parameters["wait"]


def test_the_served_document_is_the_generated_one(document):
    assert document == openapi_document(), "the fuzz test would test another document"
