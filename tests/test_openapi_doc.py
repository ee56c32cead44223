"""The committed ``openapi.json`` is the API's document (``make openapi`` regenerates it), the
document is valid OpenAPI 3.1, ``tally openapi`` writes it without a store, and
:func:`tally.api.compat.breaking_changes` finds every kind of breaking change for ``/v1``
clients on small crafted documents, and none for additions."""

from __future__ import annotations

import copy
import difflib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from tally.api.app import create_app
from tally.api.compat import breaking_changes
from tally.api.docs import openapi_text
from tally.config import Settings
from tests.server import TALLY

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "openapi.json"


def generated_document() -> dict[str, Any]:
    return create_app(Settings()).openapi()


def mismatch(committed: str, generated: str) -> str | None:
    """``None`` when the two texts are the same; else what the failing test says."""
    if committed == generated:
        return None
    lines = ["openapi.json is not the API's document: run `make openapi` and commit "
             "openapi.json."]
    try:
        breaking = breaking_changes(json.loads(committed), json.loads(generated))
    except ValueError:
        breaking = None
    if breaking is None:
        lines.append("The committed openapi.json is not JSON.")
    elif breaking:
        lines.append(f"Breaking changes for /v1 clients ({len(breaking)}):")
        lines += [f"  - {change}" for change in breaking]
    else:
        lines.append("No breaking change for /v1 clients.")
    diff = list(difflib.unified_diff(committed.splitlines(), generated.splitlines(),
                                     "openapi.json (committed)", "openapi.json (generated)",
                                     n=2, lineterm=""))
    lines += ["", *diff[:80]] + ([f"... {len(diff) - 80} more diff lines"]
                                  if len(diff) > 80 else [])
    return "\n".join(lines)


# ------------------------------------------------------------------ the committed document


def test_the_committed_openapi_json_is_the_generated_document():
    committed = COMMITTED.read_text(encoding="utf-8") if COMMITTED.exists() else ""
    problem = mismatch(committed, openapi_text(generated_document()))
    if problem:
        pytest.fail(problem, pytrace=False)


def test_the_document_is_built_once_for_every_app_of_the_process(tmp_path):
    """Each app (each test's, each start) has its own copies of the docs pages' closures;
    the document is still built once a process (hundreds of milliseconds a build)."""
    first = create_app(Settings(data_dir=tmp_path / "a")).openapi()
    second = create_app(Settings(data_dir=tmp_path / "b", regions="EU")).openapi()
    assert second is first


def test_the_mismatch_message_says_what_to_run_and_what_breaks():
    document = generated_document()
    committed = openapi_text(document)
    assert mismatch(committed, committed) is None
    changed = copy.deepcopy(document)
    del changed["paths"]["/v1/schemas"]
    changed["paths"]["/v1/new"] = changed["paths"]["/healthz"]
    message = mismatch(committed, openapi_text(changed))
    assert message is not None
    assert message.startswith("openapi.json is not the API's document: run `make openapi`")
    assert ("Breaking changes for /v1 clients (1):\n"
            "  - GET /v1/schemas: operation removed (the path is gone)\n") in message
    assert any(line.startswith("+") and '"/v1/new"' in line  # the diff shows the addition
               for line in message.splitlines())
    additive = mismatch(committed, openapi_text({**document, "info": {
        **document["info"], "description": "changed"}}))
    assert additive is not None and "No breaking change for /v1 clients." in additive


def test_the_document_is_valid_openapi_3_1():
    document = generated_document()
    assert document["openapi"].startswith("3.1.")
    validate(document)
    validate(json.loads(COMMITTED.read_text(encoding="utf-8")))
    broken = copy.deepcopy(document)  # the validator does refuse a wrong document
    broken["paths"]["/v1/schemas"]["get"]["parameters"] = [{"name": "x", "in": "body"}]
    with pytest.raises(OpenAPIValidationError):
        validate(broken)


def test_the_text_is_sorted_indented_and_ends_in_one_newline():
    text = openapi_text({"b": {"é": 1, "a": [2]}, "a": None})
    assert text == '{\n  "a": null,\n  "b": {\n    "a": [\n      2\n    ],\n    "é": 1\n  }\n}\n'


# ------------------------------------------------------------------ tally openapi


def tally(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TALLY, "openapi", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_tally_openapi_prints_and_writes_the_document_without_a_store(tmp_path):
    no_store = tmp_path / "never-created"
    env = {"TALLY_DATA_DIR": str(no_store)}
    printed = tally(env=env)
    assert printed.returncode == 0 and printed.stderr == ""
    assert printed.stdout == openapi_text(generated_document())
    out = tmp_path / "openapi.json"
    written = tally("--output", str(out), env=env)
    assert written.returncode == 0, written.stderr
    assert out.read_text(encoding="utf-8") == printed.stdout
    document = json.loads(printed.stdout)
    operations = sum(1 for item in document["paths"].values() for m in item
                     if m in ("get", "post", "put", "patch", "delete"))
    assert written.stdout == (f"wrote {out}: {len(document['paths'])} paths, "
                              f"{operations} operations\n")
    summary = json.loads(tally("--output", str(out), "--json", env=env).stdout)
    assert summary == {"output": str(out), "paths": len(document["paths"]),
                       "operations": operations, "bytes": len(printed.stdout.encode())}
    assert not no_store.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["openapi.json"]  # no partial left


def test_tally_openapi_to_an_unwritable_place_is_one_line(tmp_path):
    out = tally("--output", str(tmp_path / "missing" / "openapi.json"))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("tally: cannot write ") and out.stderr.count("\n") == 1


# ------------------------------------------------------------------ breaking_changes


def problem_response() -> dict[str, Any]:
    return {"description": "problem", "content": {"application/problem+json": {
        "schema": {"$ref": "#/components/schemas/Problem"}}}}


def base() -> dict[str, Any]:
    """A small document in FastAPI's shapes: ``$ref``s into components, optional values as
    ``anyOf`` with ``null``."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "t", "version": "1"},
        "paths": {
            "/v1/things": {
                "get": {
                    "parameters": [
                        {"name": "metric", "in": "query", "required": False, "schema": {
                            "anyOf": [{"enum": ["ggr", "stake"], "type": "string"},
                                      {"type": "null"}]}},
                        {"name": "brand", "in": "query", "required": False,
                         "schema": {"type": "string"}},
                        {"name": "If-None-Match", "in": "header", "required": False,
                         "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": {"description": "ok", "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/Things"}}}},
                        "404": problem_response(),
                    },
                },
                "post": {
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/NewThing"}}}},
                    "responses": {"201": {"description": "made", "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Thing"}}}}},
                },
            },
            "/oauth/token": {"post": {
                "requestBody": {"required": True, "content": {
                    "application/x-www-form-urlencoded": {"schema": {
                        "type": "object", "required": ["grant_type"],
                        "properties": {"grant_type": {"type": "string",
                                                      "enum": ["client_credentials"]},
                                       "scope": {"type": "string"}}}}}},
                "responses": {"200": {"description": "token"}},
            }},
            "/healthz": {"get": {"responses": {"200": {"description": "alive"}}}},
        },
        "components": {"schemas": {
            "Things": {"type": "object", "required": ["items"], "properties": {
                "items": {"type": "array", "items": {"$ref": "#/components/schemas/Thing"}},
                "next": {"anyOf": [{"type": "string"}, {"type": "null"}]}}},
            "Thing": {"type": "object", "required": ["id", "kind", "amount"], "properties": {
                "id": {"type": "string"},
                "kind": {"type": "string", "enum": ["a", "b"]},
                "amount": {"type": "integer"},
                "parent": {"anyOf": [{"$ref": "#/components/schemas/Thing"},
                                     {"type": "null"}]}}},
            "NewThing": {"type": "object", "additionalProperties": False,
                         "required": ["name"], "properties": {
                             "name": {"type": "string"},
                             "size": {"type": "integer"},
                             "colour": {"type": "string"},
                             "tags": {"type": "array", "items": {
                                 "type": "string", "enum": ["x", "y"]}}}},
            "Problem": {"type": "object", "properties": {"status": {"type": "integer"}}},
        }},
    }


def changed(edit) -> list[str]:
    """The breaking changes of ``base()`` edited by ``edit(document)``."""
    old, new = base(), base()
    edit(new)
    return breaking_changes(old, new)


def things_get(doc):
    return doc["paths"]["/v1/things"]["get"]


def param(doc, name):
    return next(p for p in things_get(doc)["parameters"] if p["name"] == name)


def schemas(doc):
    return doc["components"]["schemas"]


def test_the_crafted_documents_are_valid_openapi_3_1():
    validate(base())


def test_no_change_is_no_breaking_change():
    assert breaking_changes(base(), base()) == []


def test_a_removed_path_or_method():
    assert changed(lambda d: d["paths"].pop("/v1/things")) == [
        "GET /v1/things: operation removed (the path is gone)",
        "POST /v1/things: operation removed (the path is gone)"]
    assert changed(lambda d: d["paths"]["/v1/things"].pop("post")) == [
        "POST /v1/things: operation removed (no POST on it)"]
    assert changed(lambda d: d["paths"].pop("/oauth/token")) == [
        "POST /oauth/token: operation removed (the path is gone)"]


def test_outside_v1_nothing_is_breaking():
    assert changed(lambda d: d["paths"].pop("/healthz")) == []


def test_a_removed_parameter():
    def edit(d):
        things_get(d)["parameters"] = [p for p in things_get(d)["parameters"]
                                       if p["name"] != "brand"]
    assert changed(edit) == ["GET /v1/things: query parameter 'brand' removed"]


def test_a_parameter_that_becomes_required_and_a_new_required_one():
    assert changed(lambda d: param(d, "brand").update(required=True)) == [
        "GET /v1/things: query parameter 'brand' becomes required"]
    new = {"name": "region", "in": "query", "required": True, "schema": {"type": "string"}}
    assert changed(lambda d: things_get(d)["parameters"].append(new)) == [
        "GET /v1/things: new required query parameter 'region'"]


def test_header_parameter_names_are_case_insensitive():
    assert changed(lambda d: param(d, "If-None-Match").update(name="if-none-match")) == []


def test_a_request_body_property_that_becomes_required_and_a_new_required_one():
    assert changed(lambda d: schemas(d)["NewThing"]["required"].append("size")) == [
        "POST /v1/things: request body (application/json): property 'size' becomes required"]

    def edit(d):
        schemas(d)["NewThing"]["properties"]["weight"] = {"type": "integer"}
        schemas(d)["NewThing"]["required"].append("weight")
    assert changed(edit) == [
        "POST /v1/things: request body (application/json): new required property 'weight'"]


def test_a_request_body_that_becomes_required():
    def edit(d):
        d["paths"]["/v1/things"]["get"]["requestBody"] = {"required": True, "content": {}}
    assert changed(edit) == ["GET /v1/things: new required request body"]


def test_a_request_property_removed_where_unknown_ones_are_refused():
    assert changed(lambda d: schemas(d)["NewThing"]["properties"].pop("colour")) == [
        "POST /v1/things: request body (application/json): property 'colour' removed "
        "(no longer accepted)"]

    def tolerant(d):
        schemas(d)["NewThing"].pop("additionalProperties")
        schemas(d)["NewThing"]["properties"].pop("colour")
    assert changed(tolerant) == []


def test_a_type_change():
    assert changed(lambda d: param(d, "brand").update(schema={"type": "integer"})) == [
        "GET /v1/things: query parameter 'brand': type changed from string to integer"]
    assert changed(lambda d: schemas(d)["NewThing"]["properties"].update(
        size={"type": "string"})) == [
        "POST /v1/things: request body (application/json), property 'size': type changed "
        "from integer to string"]
    assert changed(lambda d: schemas(d)["Thing"]["properties"].update(
        amount={"type": "string"})) == [
        "GET /v1/things: response 200 (application/json), property 'items[].amount': type "
        "changed from integer to string",
        "POST /v1/things: response 201 (application/json), property 'amount': type changed "
        "from integer to string"]


def test_a_type_change_by_direction():
    # a request value that now accepts more, a response value that now sends less: fine
    widened = {"anyOf": [{"type": "number"}, {"type": "null"}]}
    assert changed(lambda d: schemas(d)["NewThing"]["properties"].update(size=widened)) == []
    assert changed(lambda d: schemas(d)["Things"]["properties"].update(
        next={"type": "string"})) == []
    # a response value that may now be null: a client may not expect it
    nullable = {"anyOf": [{"type": "integer"}, {"type": "null"}]}
    assert changed(lambda d: schemas(d)["Thing"]["properties"].update(amount=nullable)) == [
        "GET /v1/things: response 200 (application/json), property 'items[].amount': type "
        "changed from integer to integer | null",
        "POST /v1/things: response 201 (application/json), property 'amount': type changed "
        "from integer to integer | null"]


def test_an_enum_value_removed_from_a_parameter_or_request_schema():
    def metric(d):
        param(d, "metric")["schema"]["anyOf"][0]["enum"] = ["ggr"]
    assert changed(metric) == [
        "GET /v1/things: query parameter 'metric': enum value \"stake\" removed"]
    assert changed(lambda d: schemas(d)["NewThing"]["properties"]["tags"]["items"].update(
        enum=["x"])) == [
        "POST /v1/things: request body (application/json), property 'tags[]': enum value "
        "\"y\" removed"]
    assert changed(lambda d: param(d, "brand")["schema"].update(enum=["b1"])) == [
        "GET /v1/things: query parameter 'brand': now restricted to \"b1\""]
    def grant(d):
        body = d["paths"]["/oauth/token"]["post"]["requestBody"]["content"]
        body["application/x-www-form-urlencoded"]["schema"]["properties"]["grant_type"][
            "enum"] = ["refresh_token"]
    assert changed(grant) == [
        "POST /oauth/token: request body (application/x-www-form-urlencoded), property "
        "'grant_type': enum value \"client_credentials\" removed"]


def test_an_enum_value_added_to_a_parameter_is_not_breaking():
    def metric(d):
        param(d, "metric")["schema"]["anyOf"][0]["enum"] = ["ggr", "stake", "ngr"]
    assert changed(metric) == []


def test_an_enum_value_added_to_a_response_or_its_enum_lifted():
    assert changed(lambda d: schemas(d)["Thing"]["properties"]["kind"].update(
        enum=["a", "b", "c"])) == [
        "GET /v1/things: response 200 (application/json), property 'items[].kind': enum "
        "value \"c\" added",
        "POST /v1/things: response 201 (application/json), property 'kind': enum value "
        "\"c\" added"]
    assert changed(lambda d: schemas(d)["Thing"]["properties"]["kind"].pop("enum"))[0] == (
        "GET /v1/things: response 200 (application/json), property 'items[].kind': no longer "
        "an enum (any value may come)")
    # fewer response values: a client handles them all still
    assert changed(lambda d: schemas(d)["Thing"]["properties"]["kind"].update(
        enum=["a"])) == []


def test_a_response_status_or_media_type_removed():
    assert changed(lambda d: things_get(d)["responses"].pop("404")) == [
        "GET /v1/things: response 404 removed"]

    def media(d):
        ok = things_get(d)["responses"]["200"]
        ok["content"] = {"text/csv": ok["content"]["application/json"]}
    assert changed(media) == ["GET /v1/things: response 200: application/json removed"]


def test_a_response_property_removed_or_no_longer_always_present():
    assert changed(lambda d: schemas(d)["Thing"]["properties"].pop("amount")) == [
        "GET /v1/things: response 200 (application/json): property 'items[].amount' removed",
        "POST /v1/things: response 201 (application/json): property 'amount' removed"]
    assert changed(lambda d: schemas(d)["Things"]["required"].remove("items")) == [
        "GET /v1/things: response 200 (application/json): property 'items' no longer "
        "always present"]


def test_refs_are_followed_wherever_they_are():
    """A parameter, a request body and a response may each be a ``$ref`` into components;
    the change is found behind them."""
    def refs(d):
        components = d["components"]
        components["parameters"] = {"Brand": param(d, "brand")}
        components["responses"] = {"NotFound": things_get(d)["responses"]["404"]}
        components["requestBodies"] = {"NewThing": d["paths"]["/v1/things"]["post"][
            "requestBody"]}
        things_get(d)["parameters"] = [
            {"$ref": "#/components/parameters/Brand"} if p["name"] == "brand" else p
            for p in things_get(d)["parameters"]]
        things_get(d)["responses"]["404"] = {"$ref": "#/components/responses/NotFound"}
        d["paths"]["/v1/things"]["post"]["requestBody"] = {
            "$ref": "#/components/requestBodies/NewThing"}
    old, new = base(), base()
    refs(old)
    refs(new)
    assert breaking_changes(old, new) == []
    new["components"]["parameters"]["Brand"]["required"] = True
    new["components"]["responses"]["NotFound"]["content"]["application/problem+json"][
        "schema"] = {"type": "string"}
    new["components"]["schemas"]["NewThing"]["required"].append("size")
    assert breaking_changes(old, new) == [
        "GET /v1/things: query parameter 'brand' becomes required",
        "GET /v1/things: response 404 (application/problem+json): type changed from object "
        "to string",
        "GET /v1/things: response 404 (application/problem+json): property 'status' removed",
        "POST /v1/things: request body (application/json): property 'size' becomes required"]


def test_a_recursive_schema_is_compared_once_and_deep():
    assert changed(lambda d: schemas(d)["Thing"]["properties"]["id"].update(
        type="integer")) == [
        "GET /v1/things: response 200 (application/json), property 'items[].id': type "
        "changed from string to integer",
        "POST /v1/things: response 201 (application/json), property 'id': type changed from "
        "string to integer"]


def test_additions_are_not_breaking():
    def additive(d):
        optional = {"name": "limit", "in": "query", "required": False,
                    "schema": {"type": "integer"}}
        things_get(d)["parameters"].append(optional)
        d["paths"]["/v1/other"] = {"get": {"responses": {"200": {"description": "ok"}}}}
        d["paths"]["/v1/things"]["put"] = {"responses": {"200": {"description": "ok"}}}
        things_get(d)["responses"]["429"] = problem_response()
        schemas(d)["NewThing"]["properties"]["note"] = {"type": "string"}
        schemas(d)["Thing"]["properties"]["note"] = {"type": "string"}
        schemas(d)["Thing"]["required"].append("note")
        d["info"]["description"] = "more words"
    assert changed(additive) == []
