"""
docs/openapi.yaml stays true: it is a valid OpenAPI document, it names exactly the
routes of the frontend's root resource, its examples fit its schemas, and the real app (through
StubTreq, over a real SQLite file) answers every documented status code of every
operation with the headers and the body the document promises.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import treq
import yaml
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from mmgun.auth import key_hash, new_key
from mmgun.clients import Clients
from mmgun.store import DatabaseFull
from mmgun.web.app import Frontend

from .helpers import CLIENT, result, serve, sync_store

SPEC_FILE = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
SPEC: dict[str, Any] = yaml.safe_load(SPEC_FILE.read_text(encoding="utf-8"))
SPEC_URI = "urn:mmgun:openapi"
REGISTRY = Registry().with_resource(SPEC_URI, Resource.from_contents(SPEC, default_specification=DRAFT202012))
OPERATION_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

MESSAGE = {"sender": "me@example.com", "recipients": ["a@x.example", "b@y.example"], "subject": "s", "body": "b"}
MAX_MESSAGE_SIZE = 4096

#: (method, path, code) of every scenario below, for the coverage test at the end.
SCENARIOS: set[tuple[str, str, int]] = set()


_Test = TypeVar("_Test", bound=Callable[..., object])


def scenario(method: str, path: str, code: int) -> Callable[[_Test], _Test]:
    """Records that the decorated test exercises ``code`` of ``method path``."""

    def record(test: _Test) -> _Test:
        SCENARIOS.add((method, path, code))
        return test

    return record


def resolve(obj: dict[str, Any]) -> dict[str, Any]:
    """Follow an OpenAPI (not JSON Schema) ``$ref`` inside the document."""
    while "$ref" in obj:
        ref = obj["$ref"]
        assert ref.startswith("#/"), ref
        obj = SPEC
        for part in ref[2:].split("/"):
            obj = obj[part.replace("~1", "/").replace("~0", "~")]
    return obj


def _absolute_refs(schema: Any) -> Any:
    """The schema with its document-relative ``$ref``s made absolute, for the registry."""
    if isinstance(schema, dict):
        return {k: (SPEC_URI + v if k == "$ref" and v.startswith("#") else _absolute_refs(v)) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_absolute_refs(item) for item in schema]
    return schema


def schema_validator(schema: dict[str, Any]) -> Draft202012Validator:
    """OpenAPI 3.1 schemas are JSON Schema 2020-12; formats (date-time) are checked too."""
    return Draft202012Validator(
        _absolute_refs(schema), registry=REGISTRY, format_checker=Draft202012Validator.FORMAT_CHECKER
    )


def documented_operations() -> set[tuple[str, str]]:
    return {(method, path) for path, item in SPEC["paths"].items() for method in item if method in OPERATION_METHODS}


class DocumentTests(SynchronousTestCase):
    def test_is_a_valid_openapi_3_1_document(self) -> None:
        self.assertTrue(SPEC["openapi"].startswith("3.1."))
        validate_openapi(SPEC)

    def test_formats_are_checked(self) -> None:
        # jsonschema checks date-time only with rfc3339-validator installed; else it passes anything.
        self.assertTrue(list(schema_validator({"type": "string", "format": "date-time"}).iter_errors("2026-13-99")))

    def test_every_route_is_documented_and_every_operation_is_a_route(self) -> None:
        store, _ = sync_store(self)
        clients = Clients.from_ids([CLIENT])
        root = Frontend(store, lambda: clients, Clock(), hostname="mmgun.test").resource()
        # Route paths are written as OpenAPI's: /v3/{domain}/messages.
        routes = {(method.lower(), path) for method, path in root.operations()}
        self.assertEqual(routes, documented_operations())

    def test_examples_fit_their_schemas(self) -> None:
        checked = 0
        for (method, path) in sorted(documented_operations()):
            body = SPEC["paths"][path][method].get("requestBody")
            if body is None:
                continue
            for media in resolve(body)["content"].values():
                validator = schema_validator(media["schema"])
                for name, example in media.get("examples", {}).items():
                    errors = [e.message for e in validator.iter_errors(resolve(example)["value"])]
                    self.assertEqual(errors, [], f"{method} {path} example {name}")
                    checked += 1
        for name, schema in SPEC["components"]["schemas"].items():
            validator = schema_validator(schema)
            for example in schema.get("examples", []):
                self.assertEqual([e.message for e in validator.iter_errors(example)], [], name)
            for prop, sub in schema.get("properties", {}).items():
                for example in sub.get("examples", []):
                    self.assertEqual([e.message for e in schema_validator(sub).iter_errors(example)], [], f"{name}.{prop}")
        self.assertGreater(checked, 0)

    def test_every_documented_code_is_exercised_here(self) -> None:
        documented = {
            (method, path, int(code))
            for (method, path) in documented_operations()
            for code in SPEC["paths"][path][method]["responses"]
        }
        self.assertEqual(documented - SCENARIOS, set(), "documented, never checked against the app")
        self.assertEqual(SCENARIOS - documented, set(), "checked, not documented")


def conforms(case: TestCase | SynchronousTestCase, documented: dict[str, Any], response: Any, body: bytes) -> None:
    """``response`` (with its ``body``) has a content type, body and headers that ``documented`` allows."""
    (content_type,) = response.headers.getRawHeaders(b"content-type")
    media = content_type.decode("ascii").split(";")[0].strip()
    case.assertIn(media, documented["content"], f"content type {content_type!r}")
    schema = documented["content"][media]["schema"]
    document: Any = json.loads(body) if media == "application/json" else body.decode("utf-8")
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in schema_validator(schema).iter_errors(document)]
    case.assertEqual(errors, [], document)
    for name, header in documented.get("headers", {}).items():
        header = resolve(header)
        values = response.headers.getRawHeaders(name.encode("ascii"))
        if values is None:
            case.assertFalse(header.get("required", False), f"required header {name} missing")
            continue
        value: Any = values[0].decode("latin-1")
        if header["schema"].get("type") == "integer":
            case.assertRegex(value, r"^[0-9]+$", name)
            value = int(value)
        case.assertEqual([e.message for e in schema_validator(header["schema"]).iter_errors(value)], [], name)


class _FailingStore:
    """The real store, but the named coroutine methods fail (an internal error)."""

    def __init__(self, store: Any, failing: set[str], error: type[Exception] = RuntimeError) -> None:
        self._store = store
        self._failing = failing
        self._error = error

    def __getattr__(self, name: str) -> Any:
        if name in self._failing:

            async def broken(*args: Any, **kwargs: Any) -> Any:
                raise self._error(f"{name} is broken (test)")

            return broken
        return getattr(self._store, name)


class ConformanceTests(SynchronousTestCase):
    """The real app's answers, checked against what the document says of that operation and code."""

    def setUp(self) -> None:
        self.store, _ = sync_store(self)
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        result(self, self.store.add_client("acme", self.clock.seconds()))
        key_id, self.key = new_key()
        result(self, self.store.add_key("acme", key_id, key_hash(self.key), self.clock.seconds()))
        self.use()

    def use(self, failing: Collection[str] = frozenset(), error: type[Exception] = RuntimeError, **options: Any) -> None:
        """Serve a new Frontend (same database) with these options; ``failing`` store methods raise ``error``."""
        clients = Clients.from_ids([CLIENT])
        store = _FailingStore(self.store, set(failing), error) if failing else self.store
        self.frontend = Frontend(
            store, lambda: clients, self.clock, hostname="mmgun.test", max_message_size=MAX_MESSAGE_SIZE, **options
        )
        self.treq = StubTreq(self.frontend.resource())

    # -- helpers ---------------------------------------------------------------

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def request(
        self, method: str, path: str, document: Any = None, *, raw: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Any:
        data = raw if raw is not None else (json.dumps(document).encode() if document is not None else None)
        # StubTreq copies treq's functions onto itself in __init__: type checkers do not see them.
        d = self.treq.request(method, "http://mmgun.test" + path, data=data, headers=headers or {})  # type: ignore[attr-defined]
        self.treq.flush()
        response = self.successResultOf(d)
        response.body = self.successResultOf(response.content())
        return response

    def check(self, method: str, path: str, code: int, document: Any = None, **kwargs: Any) -> Any:
        """Make the request, expect ``code``, and check the answer against the document."""
        response = self.request(method.upper(), path, document, **kwargs)
        self.assertEqual(response.code, code, response.body)
        operation = SPEC["paths"].get(path, {}).get(method)
        if operation is not None:
            self.assertIn(str(code), operation["responses"], f"{method} {path}: {code} is not documented")
            conforms(self, resolve(operation["responses"][str(code)]), response, response.body)
        elif path in SPEC["paths"]:
            conforms(self, SPEC["components"]["responses"]["MethodNotAllowed"], response, response.body)
        else:
            conforms(self, SPEC["components"]["responses"]["NotFound"], response, response.body)
        return json.loads(response.body) if response.body.startswith(b"{") else response.body

    def send(self, headers: dict[str, str] | None = None) -> dict[str, Any]:
        return self.check("post", "/send", 200, MESSAGE, headers={**self.bearer, **(headers or {})})

    # -- GET / , /healthz, /metrics --------------------------------------------

    @scenario("get", "/", 200)
    def test_index(self) -> None:
        self.check("get", "/", 200)

    @scenario("get", "/healthz", 200)
    def test_healthz(self) -> None:
        self.assertEqual(self.check("get", "/healthz", 200), {"status": "ok"})

    @scenario("get", "/healthz", 503)
    def test_healthz_without_database(self) -> None:
        self.use(failing={"ping"})
        self.check("get", "/healthz", 503)
        self.flushLoggedErrors(RuntimeError)

    # -- POST /send --------------------------------------------------------------

    @scenario("post", "/send", 200)
    def test_send_with_each_kind_of_credentials(self) -> None:
        basic = base64.b64encode(f"api:{self.key}".encode()).decode()
        ids = {
            self.send()["submission_id"],
            self.check("post", "/send", 200, MESSAGE, headers={"Authorization": f"Basic {basic}"})["submission_id"],
            self.check("post", "/send", 200, {**MESSAGE, "client_id": CLIENT})["submission_id"],
        }
        self.assertEqual(len(ids), 3)

    @scenario("post", "/send", 400)
    def test_send_invalid(self) -> None:
        self.check("post", "/send", 400, raw=b"{not json", headers=self.bearer)
        self.check("post", "/send", 400, {**MESSAGE, "carbon_copy": ["x@y.example"]}, headers=self.bearer)
        self.check("post", "/send", 400, {**MESSAGE, "subject": "a\nBcc: x@y.example"}, headers=self.bearer)
        self.check("post", "/send", 400, {**MESSAGE, "client_id": CLIENT}, headers=self.bearer)
        self.check("post", "/send", 400, MESSAGE, headers={**self.bearer, "Idempotency-Key": "x" * 256})

    @scenario("post", "/send", 400)
    def test_send_invalid_new_fields(self) -> None:
        """issue 12: each new field's limits as the document states them: 400 naming the field."""
        part = {"filename": "a.png", "content_type": "image/png", "content": "iVBORw0KGgo="}
        no_text = {k: v for k, v in MESSAGE.items() if k != "body"}
        cases = {
            "'body'": {**no_text, "html": None},
            "headers": {**MESSAGE, "headers": {"Content-Type": "text/html"}},
            "attachments[0].content": {**MESSAGE, "attachments": [{**part, "content": "iVBORw0KGgo"}]},
            "attachments[0].filename": {**MESSAGE, "attachments": [{**part, "filename": "../a.png"}]},
            "attachments[0].content_type": {**MESSAGE, "attachments": [{**part, "content_type": "multipart/mixed"}]},
            "inline[0]": {**no_text, "html": "<p>no image</p>", "inline": [{**part, "content_id": "a@b"}]},
            "tags": {**MESSAGE, "tags": ["a", "b", "c", "d"]},
            "send_at": {**MESSAGE, "send_at": datetime.fromtimestamp(self.clock.seconds() + 8 * 86400, UTC).isoformat()},
            "cc[0]": {**MESSAGE, "cc": ["Bob <bob@x.example"]},
        }
        for field, document in cases.items():
            answer = self.check("post", "/send", 400, document, headers=self.bearer)
            self.assertIn(field, answer["message"])

    @scenario("post", "/send", 403)
    def test_send_sender_refused(self) -> None:
        """issue 13: with --sender-policy domains, a sender outside the client's sending domains is 403."""
        self.use(sender_policy="domains")
        answer = self.check("post", "/send", 403, MESSAGE, headers=self.bearer)
        self.assertIn("example.com", answer["message"])

    @scenario("post", "/send", 401)
    def test_send_unauthenticated(self) -> None:
        self.check("post", "/send", 401, MESSAGE)
        self.check("post", "/send", 401, {**MESSAGE, "client_id": "not-a-client-xxxxxxxx"})
        self.check("post", "/send", 401, MESSAGE, headers={"Authorization": "Bearer mmk_0123456789abcdef_" + "x" * 43})

    @scenario("post", "/send", 409)
    def test_send_idempotency_conflict(self) -> None:
        first = self.send({"Idempotency-Key": "order-42"})
        self.assertEqual(self.send({"Idempotency-Key": "order-42"}), first)
        changed = {**MESSAGE, "body": "changed"}
        self.check("post", "/send", 409, changed, headers={**self.bearer, "Idempotency-Key": "order-42"})

    @scenario("post", "/send", 413)
    def test_send_too_large(self) -> None:
        self.check("post", "/send", 413, {**MESSAGE, "body": "x" * MAX_MESSAGE_SIZE}, headers=self.bearer)

    @scenario("post", "/send", 413)
    def test_send_built_message_too_large(self) -> None:
        """issue 12: a request under --max-message-size whose built message is over it is 413, and nothing is queued."""
        # "=" is three octets quoted-printable, and the attachment a third larger in base64.
        document = {
            **MESSAGE,
            "body": "=" * 900,
            "attachments": [{"filename": "a.bin", "content_type": "application/octet-stream", "content": base64.b64encode(bytes(1200)).decode()}],
        }
        self.assertLess(len(json.dumps(document)), MAX_MESSAGE_SIZE)
        answer = self.check("post", "/send", 413, document, headers=self.bearer)
        self.assertRegex(answer["message"], r"^the message built from this request would be [0-9]+ octets, more than the maximum of 4096$")
        self.assertEqual(self.frontend.metrics.accepted._value.get(), 0)

    @scenario("post", "/send", 200)
    @scenario("post", "/status", 200)
    def test_send_every_feature_then_status(self) -> None:
        """
        issue 12: the document's example with every new field is queued as it stands; with a
        send_at ahead, /status shows the submission and each recipient scheduled, with its
        tags, metadata and send_at; once send_at has passed, queued.
        """
        examples = SPEC["paths"]["/send"]["post"]["requestBody"]["content"]["application/json"]["examples"]
        everything = dict(examples["everything"]["value"])
        send_at = self.clock.seconds() + 3600
        everything["send_at"] = datetime.fromtimestamp(send_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        submission_id = self.check("post", "/send", 200, everything, headers=self.bearer)["submission_id"]
        status = self.check("post", "/status", 200, {"submission_id": submission_id}, headers=self.bearer)
        self.assertEqual(status["status"], "scheduled")
        self.assertEqual(status["tags"], everything["tags"])
        self.assertEqual(status["metadata"], everything["metadata"])
        self.assertEqual(status["send_at"], datetime.fromtimestamp(send_at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"))
        # To, Cc and Bcc are all envelope recipients, by bare address.
        self.assertEqual(
            sorted((r["address"], r["status"]) for r in status["recipients"]),
            [("ada@another.com", "scheduled"), ("archive@example.com", "scheduled"), ("bob@third.com", "scheduled")],
        )
        self.clock.advance(3600)
        status = self.check("post", "/status", 200, {"submission_id": submission_id}, headers=self.bearer)
        self.assertEqual((status["status"], {r["status"] for r in status["recipients"]}), ("queued", {"queued"}))
        self.assertEqual(status["send_at"], datetime.fromtimestamp(send_at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"))

    @scenario("post", "/send", 200)
    def test_every_send_example_is_accepted(self) -> None:
        """issue 12: each example of /send in the document is a message the app queues (with a key for credentials)."""
        examples = SPEC["paths"]["/send"]["post"]["requestBody"]["content"]["application/json"]["examples"]
        for name, example in examples.items():
            document = {k: v for k, v in example["value"].items() if k != "client_id"}
            submission_id = self.check("post", "/send", 200, document, headers=self.bearer)["submission_id"]
            status = self.check("post", "/status", 200, {"submission_id": submission_id}, headers=self.bearer)
            # Without a send_at ahead (the example's has passed): sent at once, no send_at shown.
            self.assertEqual((status["status"], status["send_at"]), ("queued", None), name)

    @scenario("post", "/send", 429)
    def test_send_rate_limited(self) -> None:
        self.use(rate_limit=0.001, rate_burst=1)
        self.send()
        self.check("post", "/send", 429, MESSAGE, headers=self.bearer)

    @scenario("post", "/send", 500)
    def test_send_internal_error(self) -> None:
        self.use(failing={"add_submission"})
        self.assertEqual(self.check("post", "/send", 500, MESSAGE, headers=self.bearer)["message"], "internal error")
        self.flushLoggedErrors(RuntimeError)

    @scenario("post", "/send", 503)
    def test_send_database_full(self) -> None:
        self.use(failing={"add_submission"}, error=DatabaseFull)
        self.check("post", "/send", 503, MESSAGE, headers=self.bearer)

    # -- POST /status ------------------------------------------------------------

    @scenario("post", "/status", 200)
    def test_status(self) -> None:
        submission_id = self.send()["submission_id"]
        status = self.check("post", "/status", 200, {"submission_id": submission_id}, headers=self.bearer)
        self.assertEqual([r["address"] for r in status["recipients"]], MESSAGE["recipients"])
        legacy = self.check("post", "/send", 200, {**MESSAGE, "client_id": CLIENT})["submission_id"]
        self.check("post", "/status", 200, {"submission_id": legacy, "client_id": CLIENT})

    @scenario("post", "/status", 400)
    def test_status_invalid(self) -> None:
        self.check("post", "/status", 400, {"submission_id": 42}, headers=self.bearer)
        self.check("post", "/status", 400, {"submission_id": "0" * 32, "extra": 1}, headers=self.bearer)
        self.check("post", "/status", 400, {}, headers=self.bearer)
        self.check("post", "/status", 400, raw=b"[]", headers=self.bearer)

    @scenario("post", "/status", 401)
    def test_status_unauthenticated(self) -> None:
        self.check("post", "/status", 401, {"submission_id": "0" * 32})
        wrong_user = base64.b64encode(f"root:{self.key}".encode()).decode()
        self.check("post", "/status", 401, {"submission_id": "0" * 32}, headers={"Authorization": f"Basic {wrong_user}"})

    @scenario("post", "/status", 404)
    def test_status_unknown_submission(self) -> None:
        self.check("post", "/status", 404, {"submission_id": "0" * 32}, headers=self.bearer)
        self.check("post", "/status", 404, {"submission_id": "not an id"}, headers=self.bearer)
        mine = self.check("post", "/send", 200, {**MESSAGE, "client_id": CLIENT})["submission_id"]
        self.check("post", "/status", 404, {"submission_id": mine}, headers=self.bearer)

    @scenario("post", "/status", 413)
    def test_status_too_large(self) -> None:
        self.check("post", "/status", 413, {"submission_id": "x" * MAX_MESSAGE_SIZE}, headers=self.bearer)

    @scenario("post", "/status", 429)
    def test_status_after_repeated_authentication_failures(self) -> None:
        for _ in range(10):
            self.check("post", "/status", 401, {"submission_id": "0" * 32, "client_id": "not-a-client-xxxxxxxx"})
        # A client_id is not even checked from a blocked address (an API key would be: issue 11 item 14).
        self.check("post", "/status", 429, {"submission_id": "0" * 32, "client_id": CLIENT})

    @scenario("post", "/status", 500)
    def test_status_internal_error(self) -> None:
        self.use(failing={"submission"})
        self.check("post", "/status", 500, {"submission_id": "0" * 32}, headers=self.bearer)
        self.flushLoggedErrors(RuntimeError)

    @scenario("post", "/status", 503)
    def test_status_database_unavailable(self) -> None:
        self.use(failing={"submission"}, error=DatabaseFull)
        self.check("post", "/status", 503, {"submission_id": "0" * 32}, headers=self.bearer)

    # -- outside the operations ----------------------------------------------------

    def test_wrong_method_is_405_with_allow(self) -> None:
        cases = [("get", "/send", "POST"), ("put", "/status", "POST"), ("post", "/", "GET, HEAD"), ("delete", "/metrics", "GET, HEAD")]
        for method, path, allowed in cases:
            self.check(method, path, 405)
            (allow,) = self.request(method.upper(), path).headers.getRawHeaders(b"allow")
            self.assertEqual(sorted(allow.decode().split(", ")), sorted(allowed.split(", ")))

    def test_unknown_path_is_404(self) -> None:
        self.check("get", "/nope", 404)
        self.check("post", "/send/", 404, MESSAGE, headers=self.bearer)


class MetricsConformanceTests(TestCase):
    """/metrics is prometheus_client's WSGI resource, which answers from a thread: a real port."""

    @scenario("get", "/metrics", 200)
    def test_metrics_are_text(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._metrics())

    async def _metrics(self) -> None:
        from twisted.internet import reactor

        store, _ = sync_store(self)
        clients = Clients.from_ids([CLIENT])
        frontend = Frontend(store, lambda: clients, Clock(), hostname="mmgun.test")
        frontend.metrics.accepted.inc()
        url = serve(self, frontend)
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(f"{url}/metrics", pool=pool)
        body = await response.content()
        self.assertEqual(response.code, 200)
        conforms(self, resolve(SPEC["paths"]["/metrics"]["get"]["responses"]["200"]), response, body)
        self.assertIn(b"mmgun_submissions_accepted_total 1.0", body)


class MailgunConformanceTests(SynchronousTestCase):
    """issue 12 (v3 API): every documented code of the two v3 operations, checked against the document."""

    MIME = b"From: Ada <ada@example.com>\r\nTo: b@x.example\r\nSubject: s\r\n\r\nhello\r\n"

    def setUp(self) -> None:
        self.store, _ = sync_store(self)
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        result(self, self.store.add_client("acme", self.clock.seconds()))
        key_id, self.key = new_key()
        result(self, self.store.add_key("acme", key_id, key_hash(self.key), self.clock.seconds()))
        # issue 13: {domain} is one of the client's sending domains.
        for domain in ("example.com", "other.example"):
            result(self, self.store.add_domain(domain, "acme", self.clock.seconds()))
        self.use()

    def use(self, failing: Collection[str] = frozenset(), error: type[Exception] = RuntimeError, **options: Any) -> None:
        """As ConformanceTests.use; the stub's Site leaves form bodies to the API, as the frontend's does."""
        from .test_mailgun_api import like_the_frontend

        clients = Clients.from_ids([CLIENT])
        store = _FailingStore(self.store, set(failing), error) if failing else self.store
        self.frontend = Frontend(
            store, lambda: clients, self.clock, hostname="mmgun.test", max_message_size=MAX_MESSAGE_SIZE, **options
        )
        self.treq = like_the_frontend(StubTreq(self.frontend.resource()))

    def request(self, method: str, path: str, *, raw: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
        d = self.treq.request(method, "http://mmgun.test" + path, data=raw, headers=headers or {})  # type: ignore[attr-defined]
        self.treq.flush()
        response = self.successResultOf(d)
        response.body = self.successResultOf(response.content())
        return response

    def status(self, message_id: str) -> dict[str, Any]:
        response = self.request("POST", "/status", raw=json.dumps({"message_id": message_id}).encode(), headers={"Authorization": f"Bearer {self.key}"})
        self.assertEqual(response.code, 200)
        conforms(self, resolve(SPEC["paths"]["/status"]["post"]["responses"]["200"]), response, response.body)
        document: dict[str, Any] = json.loads(response.body)
        return document

    def check_v3(self, operation: str, code: int, fields: list[tuple[str, Any]], *, domain: str = "example.com", auth: bool = True) -> Any:
        from .test_mailgun_api import basic, form_data

        body, content_type = form_data(fields)
        headers = {"Content-Type": content_type, **(basic(self.key) if auth else {})}
        response = self.request("POST", f"/v3/{domain}/{operation}", raw=body, headers=headers)
        self.assertEqual(response.code, code, response.body)
        documented = SPEC["paths"][f"/v3/{{domain}}/{operation}"]["post"]["responses"]
        self.assertIn(str(code), documented)
        conforms(self, resolve(documented[str(code)]), response, response.body)
        return json.loads(response.body)

    def both(self, code: int, message: list[tuple[str, Any]], mime: list[tuple[str, Any]], **kwargs: Any) -> list[Any]:
        return [self.check_v3("messages", code, message, **kwargs), self.check_v3("messages.mime", code, mime, **kwargs)]

    def fields(self, **extra: Any) -> list[tuple[str, Any]]:
        return [("from", "Ada <ada@example.com>"), ("to", "b@x.example"), ("subject", "s"), ("text", "hello"), *extra.items()]

    def mime_fields(self) -> list[tuple[str, Any]]:
        return [("to", "b@x.example"), ("message", ("message.eml", self.MIME))]

    @scenario("post", "/v3/{domain}/messages", 200)
    @scenario("post", "/v3/{domain}/messages.mime", 200)
    @scenario("post", "/status", 200)
    def test_queued_then_status_by_message_id(self) -> None:
        for answer in self.both(200, self.fields(), self.mime_fields()):
            status = self.status(answer["id"])
            self.assertEqual([r["address"] for r in status["recipients"]], ["b@x.example"])

    @scenario("post", "/v3/{domain}/messages", 400)
    @scenario("post", "/v3/{domain}/messages.mime", 400)
    def test_invalid(self) -> None:
        answers = self.both(400, self.fields(), self.mime_fields(), domain="other.example")
        self.assertIn("sending domain", answers[0]["message"])
        self.both(400, [("from", "x")], [("to", "b@x.example")])

    @scenario("post", "/v3/{domain}/messages", 401)
    @scenario("post", "/v3/{domain}/messages.mime", 401)
    def test_unauthenticated(self) -> None:
        self.both(401, self.fields(), self.mime_fields(), auth=False)

    @scenario("post", "/v3/{domain}/messages", 404)
    @scenario("post", "/v3/{domain}/messages.mime", 404)
    def test_no_domain(self) -> None:
        self.both(404, self.fields(), self.mime_fields(), domain="")
        # issue 13: a domain that is not one of the client's.
        answers = self.both(404, self.fields(), self.mime_fields(), domain="unknown.example")
        self.assertEqual(answers, [{"message": "Domain not found: unknown.example"}] * 2)

    @scenario("post", "/v3/{domain}/messages", 413)
    @scenario("post", "/v3/{domain}/messages.mime", 413)
    def test_too_large(self) -> None:
        self.both(413, self.fields(text="x" * MAX_MESSAGE_SIZE), [("to", "b@x.example"), ("message", ("m.eml", self.MIME + b"x" * MAX_MESSAGE_SIZE))])

    @scenario("post", "/v3/{domain}/messages", 429)
    @scenario("post", "/v3/{domain}/messages.mime", 429)
    def test_rate_limited(self) -> None:
        self.use(rate_limit=0.001, rate_burst=1)
        self.check_v3("messages", 200, self.fields())
        self.both(429, self.fields(), self.mime_fields())

    @scenario("post", "/v3/{domain}/messages", 500)
    @scenario("post", "/v3/{domain}/messages.mime", 500)
    def test_internal_error(self) -> None:
        self.use(failing={"add_submission"})
        self.assertEqual(self.both(500, self.fields(), self.mime_fields()), [{"message": "internal error"}] * 2)
        self.flushLoggedErrors(RuntimeError)

    @scenario("post", "/v3/{domain}/messages", 503)
    @scenario("post", "/v3/{domain}/messages.mime", 503)
    def test_database_full(self) -> None:
        self.use(failing={"add_submission"}, error=DatabaseFull)
        self.both(503, self.fields(), self.mime_fields())
