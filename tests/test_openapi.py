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


class EventsConformanceTests(SynchronousTestCase):
    """issue 14 (event log): every documented code of GET /events and GET /v3/{domain}/events[/{page}], checked against the document."""

    def setUp(self) -> None:
        self.store, _ = sync_store(self)
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        result(self, self.store.add_client("acme", self.clock.seconds()))
        key_id, self.key = new_key()
        result(self, self.store.add_key("acme", key_id, key_hash(self.key), self.clock.seconds()))
        result(self, self.store.add_domain("example.com", "acme", self.clock.seconds()))
        self.use()
        # One test-mode message: an accepted and a delivered event, with tags and metadata.
        from .test_mailgun_api import form_data

        body, content_type = form_data([("from", "ada@example.com"), ("to", "b@x.example"), ("subject", "s"), ("text", "t"), ("o:testmode", "yes"), ("o:tag", "t1"), ("v:k", "v")])
        response = self.request("POST", "/v3/example.com/messages", raw=body, headers={"Content-Type": content_type, **self.auth})
        self.assertEqual(response.code, 200, response.body)

    def use(self, failing: Collection[str] = frozenset(), error: type[Exception] = RuntimeError) -> None:
        clients = Clients.from_ids([CLIENT])
        store = _FailingStore(self.store, set(failing), error) if failing else self.store
        self.frontend = Frontend(store, lambda: clients, self.clock, hostname="mmgun.test")
        self.treq = StubTreq(self.frontend.resource())

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def request(self, method: str, path: str, *, raw: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
        d = self.treq.request(method, "http://mmgun.test" + path, data=raw, headers=headers or {})  # type: ignore[attr-defined]
        self.treq.flush()
        response = self.successResultOf(d)
        response.body = self.successResultOf(response.content())
        return response

    def check(self, operation: str, path: str, code: int, *, auth: bool = True) -> Any:
        response = self.request("GET", path, headers=self.auth if auth else {})
        self.assertEqual(response.code, code, response.body)
        documented = SPEC["paths"][operation]["get"]["responses"]
        self.assertIn(str(code), documented)
        conforms(self, resolve(documented[str(code)]), response, response.body)
        return json.loads(response.body)

    def token(self) -> str:
        page = self.check("/v3/{domain}/events", "/v3/example.com/events", 200)
        return str(page["paging"]["next"]).rpartition("/")[2]

    @scenario("get", "/events", 200)
    @scenario("get", "/v3/{domain}/events", 200)
    @scenario("get", "/v3/{domain}/events/{page}", 200)
    def test_events(self) -> None:
        feed = self.check("/events", "/events?limit=10", 200)
        self.assertEqual([i["event"] for i in feed["items"]], ["accepted", "delivered"])
        page = self.check("/v3/{domain}/events", "/v3/example.com/events?ascending=yes&limit=1&event=delivered", 200)
        self.assertEqual(page["items"], feed["items"][1:])
        token = page["paging"]["previous"].rpartition("/")[2]
        self.check("/v3/{domain}/events/{page}", f"/v3/example.com/events/{token}", 200)

    @scenario("get", "/events", 400)
    @scenario("get", "/v3/{domain}/events", 400)
    @scenario("get", "/v3/{domain}/events/{page}", 400)
    def test_invalid(self) -> None:
        self.check("/events", "/events?after=x", 400)
        self.check("/v3/{domain}/events", "/v3/example.com/events?limit=301", 400)
        self.check("/v3/{domain}/events/{page}", "/v3/example.com/events/AAAA", 400)

    @scenario("get", "/events", 401)
    @scenario("get", "/v3/{domain}/events", 401)
    @scenario("get", "/v3/{domain}/events/{page}", 401)
    def test_unauthenticated(self) -> None:
        token = self.token()
        self.check("/events", "/events", 401, auth=False)
        self.check("/v3/{domain}/events", "/v3/example.com/events", 401, auth=False)
        self.check("/v3/{domain}/events/{page}", f"/v3/example.com/events/{token}", 401, auth=False)

    @scenario("get", "/v3/{domain}/events", 404)
    @scenario("get", "/v3/{domain}/events/{page}", 404)
    def test_not_a_domain_of_the_client(self) -> None:
        token = self.token()
        self.check("/v3/{domain}/events", "/v3/other.example/events", 404)
        self.check("/v3/{domain}/events/{page}", f"/v3/other.example/events/{token}", 404)

    @scenario("get", "/events", 429)
    @scenario("get", "/v3/{domain}/events", 429)
    @scenario("get", "/v3/{domain}/events/{page}", 429)
    def test_after_repeated_authentication_failures(self) -> None:
        token = self.token()
        for _ in range(10):
            self.request("GET", "/events", headers={"Authorization": "Bearer mmk_0123456789abcdef_" + "x" * 43})
        self.check("/events", "/events", 429, auth=False)
        self.check("/v3/{domain}/events", "/v3/example.com/events", 429, auth=False)
        self.check("/v3/{domain}/events/{page}", f"/v3/example.com/events/{token}", 429, auth=False)

    @scenario("get", "/events", 500)
    @scenario("get", "/v3/{domain}/events", 500)
    @scenario("get", "/v3/{domain}/events/{page}", 500)
    def test_internal_error(self) -> None:
        token = self.token()
        self.use(failing={"events", "events_page"})
        self.check("/events", "/events", 500)
        self.check("/v3/{domain}/events", "/v3/example.com/events", 500)
        self.check("/v3/{domain}/events/{page}", f"/v3/example.com/events/{token}", 500)
        self.flushLoggedErrors(RuntimeError)

    @scenario("get", "/events", 503)
    @scenario("get", "/v3/{domain}/events", 503)
    @scenario("get", "/v3/{domain}/events/{page}", 503)
    def test_database_unavailable(self) -> None:
        token = self.token()
        self.use(failing={"events", "events_page"}, error=DatabaseFull)
        self.check("/events", "/events", 503)
        self.check("/v3/{domain}/events", "/v3/example.com/events", 503)
        self.check("/v3/{domain}/events/{page}", f"/v3/example.com/events/{token}", 503)


class SuppressionsConformanceTests(SynchronousTestCase):
    """issue 14 (suppression lists): every documented code of /suppressions and /v3/{domain}/{table}[/{address}], checked against the document."""

    #: (method, documented path, a URL of it) of every suppression operation.
    OPERATIONS = [
        ("get", "/suppressions", "/suppressions?kind=bounce"),
        ("post", "/suppressions", "/suppressions"),
        ("delete", "/suppressions", "/suppressions?kind=bounce&all=true"),
        ("get", "/v3/{domain}/{table}", "/v3/example.com/bounces"),
        ("post", "/v3/{domain}/{table}", "/v3/example.com/bounces"),
        ("delete", "/v3/{domain}/{table}", "/v3/example.com/bounces"),
        ("get", "/v3/{domain}/{table}/{address}", "/v3/example.com/bounces/a@x.example"),
        ("delete", "/v3/{domain}/{table}/{address}", "/v3/example.com/bounces/a@x.example"),
    ]
    METHODS = ("suppressions", "suppression", "add_suppressions", "remove_suppression", "clear_suppressions")

    def setUp(self) -> None:
        self.store, _ = sync_store(self)
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        result(self, self.store.add_client("acme", self.clock.seconds()))
        key_id, self.key = new_key()
        result(self, self.store.add_key("acme", key_id, key_hash(self.key), self.clock.seconds()))
        result(self, self.store.add_domain("example.com", "acme", self.clock.seconds()))
        self.use()

    def use(self, failing: Collection[str] = frozenset(), error: type[Exception] = RuntimeError) -> None:
        from .test_mailgun_api import like_the_frontend

        clients = Clients.from_ids([CLIENT])
        store = _FailingStore(self.store, set(failing), error) if failing else self.store
        self.frontend = Frontend(store, lambda: clients, self.clock, hostname="mmgun.test", max_message_size=MAX_MESSAGE_SIZE)
        self.treq = like_the_frontend(StubTreq(self.frontend.resource()))

    def check(self, method: str, path: str, url: str, code: int, *, body: bytes | None = None, auth: str | None = "key") -> Any:
        from .test_mailgun_api import basic, form_data

        headers: dict[str, str] = {}
        if body is None and method == "post":
            if path == "/suppressions":
                body, headers["Content-Type"] = json.dumps({"kind": "bounce", "address": "a@x.example"}).encode(), "application/json"
            else:
                body, headers["Content-Type"] = form_data([("address", "a@x.example")])
        elif body is not None:
            headers["Content-Type"] = "application/json"
        if auth is not None:
            headers.update(basic(self.key if auth == "key" else new_key()[1]))
        d = self.treq.request(method.upper(), "http://mmgun.test" + url, data=body, headers=headers)  # type: ignore[attr-defined]
        self.treq.flush()
        response = self.successResultOf(d)
        content = self.successResultOf(response.content())
        self.assertEqual(response.code, code, (method, url, content))
        documented = SPEC["paths"][path][method]["responses"]
        self.assertIn(str(code), documented)
        conforms(self, resolve(documented[str(code)]), response, content)
        return json.loads(content)

    @scenario("post", "/suppressions", 200)
    @scenario("post", "/v3/{domain}/{table}", 200)
    @scenario("get", "/suppressions", 200)
    @scenario("get", "/v3/{domain}/{table}", 200)
    @scenario("get", "/v3/{domain}/{table}/{address}", 200)
    @scenario("delete", "/v3/{domain}/{table}/{address}", 200)
    @scenario("delete", "/v3/{domain}/{table}", 200)
    @scenario("delete", "/suppressions", 200)
    def test_each_operation(self) -> None:
        (get, post, delete, v3_get, v3_post, v3_delete, v3_get_one, v3_delete_one) = self.OPERATIONS
        self.check(*post, 200)
        self.check(*v3_post[:2], v3_post[2], 200)
        self.check(*v3_post[:2], v3_post[2], 200, body=json.dumps([{"address": "b@x.example", "code": 550}]).encode())
        self.assertEqual(len(self.check(*get, 200)["items"]), 2)
        self.assertEqual(len(self.check(*v3_get, 200)["items"]), 2)
        self.assertEqual(self.check(*v3_get_one, 200)["code"], "550")
        self.check(*v3_delete_one, 200)
        self.check(*v3_delete, 200)
        self.assertEqual(self.check(*delete, 200)["removed"], 0)

    @scenario("get", "/suppressions", 400)
    @scenario("post", "/suppressions", 400)
    @scenario("delete", "/suppressions", 400)
    @scenario("get", "/v3/{domain}/{table}", 400)
    @scenario("post", "/v3/{domain}/{table}", 400)
    @scenario("delete", "/v3/{domain}/{table}", 400)
    @scenario("get", "/v3/{domain}/{table}/{address}", 400)
    @scenario("delete", "/v3/{domain}/{table}/{address}", 400)
    def test_invalid(self) -> None:
        for method, path, url in self.OPERATIONS:
            if method == "post":
                self.check(method, path, url, 400, body=json.dumps([{"address": "not an address"}] if path != "/suppressions" else {"kind": "spam"}).encode())
            else:
                self.check(method, path, url + ("&" if "?" in url else "?") + "color=red", 400)

    @scenario("get", "/suppressions", 401)
    @scenario("post", "/suppressions", 401)
    @scenario("delete", "/suppressions", 401)
    @scenario("get", "/v3/{domain}/{table}", 401)
    @scenario("post", "/v3/{domain}/{table}", 401)
    @scenario("delete", "/v3/{domain}/{table}", 401)
    @scenario("get", "/v3/{domain}/{table}/{address}", 401)
    @scenario("delete", "/v3/{domain}/{table}/{address}", 401)
    def test_unauthenticated(self) -> None:
        for operation in self.OPERATIONS:
            self.check(*operation, 401, auth=None)

    @scenario("get", "/suppressions", 429)
    @scenario("post", "/suppressions", 429)
    @scenario("delete", "/suppressions", 429)
    @scenario("get", "/v3/{domain}/{table}", 429)
    @scenario("post", "/v3/{domain}/{table}", 429)
    @scenario("delete", "/v3/{domain}/{table}", 429)
    @scenario("get", "/v3/{domain}/{table}/{address}", 429)
    @scenario("delete", "/v3/{domain}/{table}/{address}", 429)
    def test_after_repeated_authentication_failures(self) -> None:
        for _ in range(10):
            self.check(*self.OPERATIONS[0], 401, auth="wrong")
        for operation in self.OPERATIONS:
            self.check(*operation, 429, auth="wrong")

    @scenario("delete", "/suppressions", 404)
    @scenario("get", "/v3/{domain}/{table}", 404)
    @scenario("post", "/v3/{domain}/{table}", 404)
    @scenario("delete", "/v3/{domain}/{table}", 404)
    @scenario("get", "/v3/{domain}/{table}/{address}", 404)
    @scenario("delete", "/v3/{domain}/{table}/{address}", 404)
    def test_not_found(self) -> None:
        self.check("delete", "/suppressions", "/suppressions?kind=bounce&address=a@x.example", 404)
        for method, path, url in self.OPERATIONS[3:]:
            self.assertEqual(self.check(method, path, url.replace("example.com", "unknown.example"), 404), {"message": "Domain not found: unknown.example"})
        self.assertEqual(self.check(*self.OPERATIONS[6], 404), {"message": "Address not found in bounces table"})

    @scenario("post", "/suppressions", 413)
    @scenario("post", "/v3/{domain}/{table}", 413)
    def test_too_large(self) -> None:
        from mmgun.web.suppressions_api import MAX_BODY

        for method, path, url in (self.OPERATIONS[1], self.OPERATIONS[4]):
            self.check(method, path, url, 413, body=b" " * (MAX_BODY + 1))

    @scenario("get", "/suppressions", 500)
    @scenario("post", "/suppressions", 500)
    @scenario("delete", "/suppressions", 500)
    @scenario("get", "/v3/{domain}/{table}", 500)
    @scenario("post", "/v3/{domain}/{table}", 500)
    @scenario("delete", "/v3/{domain}/{table}", 500)
    @scenario("get", "/v3/{domain}/{table}/{address}", 500)
    @scenario("delete", "/v3/{domain}/{table}/{address}", 500)
    def test_internal_error(self) -> None:
        self.use(failing=self.METHODS)
        for operation in self.OPERATIONS:
            self.assertEqual(self.check(*operation, 500)["message"], "internal error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), len(self.OPERATIONS))

    @scenario("get", "/suppressions", 503)
    @scenario("post", "/suppressions", 503)
    @scenario("delete", "/suppressions", 503)
    @scenario("get", "/v3/{domain}/{table}", 503)
    @scenario("post", "/v3/{domain}/{table}", 503)
    @scenario("delete", "/v3/{domain}/{table}", 503)
    @scenario("get", "/v3/{domain}/{table}/{address}", 503)
    @scenario("delete", "/v3/{domain}/{table}/{address}", 503)
    def test_database_full(self) -> None:
        self.use(failing=self.METHODS, error=DatabaseFull)
        for operation in self.OPERATIONS:
            self.check(*operation, 503)


class WebhooksConformanceTests(SuppressionsConformanceTests):
    """issue 14 (webhooks): every documented code of /v3/domains/{domain}/webhooks[/{webhook}], checked against the document."""

    OPERATIONS = [
        ("get", "/v3/domains/{domain}/webhooks", "/v3/domains/example.com/webhooks"),
        ("post", "/v3/domains/{domain}/webhooks", "/v3/domains/example.com/webhooks"),
        ("get", "/v3/domains/{domain}/webhooks/{webhook}", "/v3/domains/example.com/webhooks/delivered"),
        ("put", "/v3/domains/{domain}/webhooks/{webhook}", "/v3/domains/example.com/webhooks/delivered"),
        ("delete", "/v3/domains/{domain}/webhooks/{webhook}", "/v3/domains/example.com/webhooks/delivered"),
    ]
    METHODS = ("webhooks", "webhook_key", "add_webhook", "update_webhook", "remove_webhook")

    def check(self, method: str, path: str, url: str, code: int, *, body: bytes | None = None, auth: str | None = "key", form: Any = None) -> Any:
        from .test_mailgun_api import basic, form_data

        headers: dict[str, str] = {}
        if body is None and method in ("post", "put"):
            fields = form if form is not None else [("id", "delivered"), ("url", "https://app.example/h")] if method == "post" else [("url", "https://app.example/new")]
            body, headers["Content-Type"] = form_data(fields)
        elif body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        if auth is not None:
            headers.update(basic(self.key if auth == "key" else new_key()[1]))
        d = self.treq.request(method.upper(), "http://mmgun.test" + url, data=body, headers=headers)  # type: ignore[attr-defined]
        self.treq.flush()
        response = self.successResultOf(d)
        content = self.successResultOf(response.content())
        self.assertEqual(response.code, code, (method, url, content))
        documented = SPEC["paths"][path][method]["responses"]
        self.assertIn(str(code), documented)
        conforms(self, resolve(documented[str(code)]), response, content)
        return json.loads(content)

    @scenario("get", "/v3/domains/{domain}/webhooks", 200)
    @scenario("post", "/v3/domains/{domain}/webhooks", 200)
    @scenario("get", "/v3/domains/{domain}/webhooks/{webhook}", 200)
    @scenario("put", "/v3/domains/{domain}/webhooks/{webhook}", 200)
    @scenario("delete", "/v3/domains/{domain}/webhooks/{webhook}", 200)
    def test_each_operation(self) -> None:
        listing, create, get, put, delete = self.OPERATIONS
        self.assertEqual(self.check(*listing, 200), {"webhooks": {}})
        self.check(*create, 200)
        self.assertEqual(self.check(*listing, 200)["webhooks"], {"delivered": {"urls": ["https://app.example/h"]}})
        self.assertEqual(self.check(*get, 200), {"webhook": {"urls": ["https://app.example/h"]}})
        self.assertEqual(self.check(*put, 200)["webhook"], {"urls": ["https://app.example/new"]})
        self.assertEqual(self.check(*delete, 200)["webhook"], {"urls": ["https://app.example/new"]})

    @scenario("get", "/v3/domains/{domain}/webhooks", 400)
    @scenario("post", "/v3/domains/{domain}/webhooks", 400)
    @scenario("get", "/v3/domains/{domain}/webhooks/{webhook}", 400)
    @scenario("put", "/v3/domains/{domain}/webhooks/{webhook}", 400)
    @scenario("delete", "/v3/domains/{domain}/webhooks/{webhook}", 400)
    def test_invalid(self) -> None:
        for method, path, url in self.OPERATIONS:
            if method == "post":
                self.check(method, path, url, 400, form=[("id", "opened"), ("url", "https://app.example/h")])
            elif method == "put":
                self.check(*self.OPERATIONS[1], 200)
                self.check(method, path, url, 400, form=[("url", "gopher://app.example/")])
            else:
                self.check(method, path, url + "?color=red", 400)

    @scenario("get", "/v3/domains/{domain}/webhooks", 401)
    @scenario("post", "/v3/domains/{domain}/webhooks", 401)
    @scenario("get", "/v3/domains/{domain}/webhooks/{webhook}", 401)
    @scenario("put", "/v3/domains/{domain}/webhooks/{webhook}", 401)
    @scenario("delete", "/v3/domains/{domain}/webhooks/{webhook}", 401)
    def test_unauthenticated(self) -> None:
        for operation in self.OPERATIONS:
            self.check(*operation, 401, auth=None)

    @scenario("get", "/v3/domains/{domain}/webhooks", 429)
    @scenario("post", "/v3/domains/{domain}/webhooks", 429)
    @scenario("get", "/v3/domains/{domain}/webhooks/{webhook}", 429)
    @scenario("put", "/v3/domains/{domain}/webhooks/{webhook}", 429)
    @scenario("delete", "/v3/domains/{domain}/webhooks/{webhook}", 429)
    def test_after_repeated_authentication_failures(self) -> None:
        super().test_after_repeated_authentication_failures()

    @scenario("get", "/v3/domains/{domain}/webhooks", 404)
    @scenario("post", "/v3/domains/{domain}/webhooks", 404)
    @scenario("get", "/v3/domains/{domain}/webhooks/{webhook}", 404)
    @scenario("put", "/v3/domains/{domain}/webhooks/{webhook}", 404)
    @scenario("delete", "/v3/domains/{domain}/webhooks/{webhook}", 404)
    def test_not_found(self) -> None:
        for method, path, url in self.OPERATIONS:
            self.assertEqual(self.check(method, path, url.replace("example.com", "unknown.example"), 404), {"message": "Domain not found: unknown.example"})
        for operation in self.OPERATIONS[2:]:
            self.assertEqual(self.check(*operation, 404), {"message": "Webhook not found"})

    @scenario("post", "/v3/domains/{domain}/webhooks", 413)
    @scenario("put", "/v3/domains/{domain}/webhooks/{webhook}", 413)
    def test_too_large(self) -> None:
        from mmgun.web.webhooks_api import MAX_BODY

        self.check(*self.OPERATIONS[1], 200)
        for method, path, url in (self.OPERATIONS[1], self.OPERATIONS[3]):
            self.check(method, path, url, 413, body=b"url=" + b"x" * MAX_BODY)

    @scenario("get", "/v3/domains/{domain}/webhooks", 500)
    @scenario("post", "/v3/domains/{domain}/webhooks", 500)
    @scenario("get", "/v3/domains/{domain}/webhooks/{webhook}", 500)
    @scenario("put", "/v3/domains/{domain}/webhooks/{webhook}", 500)
    @scenario("delete", "/v3/domains/{domain}/webhooks/{webhook}", 500)
    def test_internal_error(self) -> None:
        super().test_internal_error()

    @scenario("get", "/v3/domains/{domain}/webhooks", 503)
    @scenario("post", "/v3/domains/{domain}/webhooks", 503)
    @scenario("get", "/v3/domains/{domain}/webhooks/{webhook}", 503)
    @scenario("put", "/v3/domains/{domain}/webhooks/{webhook}", 503)
    @scenario("delete", "/v3/domains/{domain}/webhooks/{webhook}", 503)
    def test_database_full(self) -> None:
        super().test_database_full()
