"""The HTTP API, through StubTreq against the real root resource and a real SQLite file."""

from __future__ import annotations

import email
import json
from email.policy import default
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from . import test_mailgun_api
from .helpers import CLIENT, CLIENT_LABEL, OTHER_CLIENT, make_api, result


class SendTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.api, self.store, self.clock = make_api(self, max_recipients=5, max_message_size=4096)

    def test_send_queues_and_returns_id(self) -> None:
        code, body = self.api.send()
        self.assertEqual(code, 200)
        self.assertEqual(body["result"], "queued")
        self.assertRegex(body["submission_id"], r"^[0-9a-f]{32}$")
        state = result(self, self.store.submission(CLIENT_LABEL, body["submission_id"]))
        self.assertEqual([r.address for r in state.recipients], ["alice@another.com", "bob@third.com"])

    def test_status_of_new_submission_is_queued(self) -> None:
        _, sent = self.api.send()
        code, body = self.api.status(sent["submission_id"])
        self.assertEqual(code, 200)
        self.assertEqual(body["result"], "success")
        self.assertEqual(body["status"], "queued")
        self.assertEqual(
            body["recipients"][0],
            {
                "address": "alice@another.com",
                "status": "queued",
                "attempts": 0,
                "last_reply": None,
                "updated_at": "2027-01-15T08:00:00.000Z",
            },
        )

    def test_recipients_grouped_by_domain_and_deduplicated(self) -> None:
        _, sent = self.api.send(recipients=["a@X.example", "b@x.EXAMPLE", "a@x.example", "c@y.example"])
        claimed = result(self, self.store.claim("test", self.clock.seconds(), 60, 10))
        self.assertEqual(
            sorted((e.domain, e.recipients) for e in claimed),
            [("x.example", ("a@x.example", "b@x.example")), ("y.example", ("c@y.example",))],
        )

    def test_idn_domain_encoded(self) -> None:
        _, sent = self.api.send(recipients=["jürgen@münchen.example"][:0] + ["j@MÜNCHEN.example"])
        _, status = self.api.status(sent["submission_id"])
        self.assertEqual(status["recipients"][0]["address"], "j@xn--mnchen-3ya.example")

    def test_message_built_with_headers(self) -> None:
        self.api.send(subject="Grüße", body="line one\nline two\r\n.\rend")
        (envelope,) = result(self, self.store.claim("test", self.clock.seconds(), 60, 10))[:1]
        self.assertNotIn(b"\r\n", envelope.message.replace(b"\r\n", b""))
        self.assertNotIn(b"\n", envelope.message.replace(b"\r\n", b""))
        parsed = email.message_from_bytes(envelope.message, policy=default)
        self.assertEqual(parsed["Subject"], "Grüße")
        self.assertEqual(parsed["From"], "me@example.com")
        self.assertEqual(parsed.get_content().replace("\r\n", "\n"), "line one\nline two\n.\nend\n")
        self.assertTrue(parsed["Message-ID"].endswith("@mmgun.test>"))

    def test_idempotency_key_replay_returns_same_id(self) -> None:
        _, first = self.api.send(headers={"Idempotency-Key": "order-42"})
        code, second = self.api.send(headers={"Idempotency-Key": "order-42"})
        self.assertEqual(code, 200)
        self.assertEqual(first["submission_id"], second["submission_id"])
        self.assertEqual(len(result(self, self.store.claim("t", self.clock.seconds(), 60, 100))), 2)

    def test_idempotency_key_with_other_body_is_409(self) -> None:
        self.api.send(headers={"Idempotency-Key": "order-42"})
        code, body = self.api.send(headers={"Idempotency-Key": "order-42"}, body="changed")
        self.assertEqual((code, body["result"]), (409, "error"))

    def test_idempotency_key_expires_after_a_day(self) -> None:
        _, first = self.api.send(headers={"Idempotency-Key": "k"})
        self.clock.advance(24 * 3600 + 1)
        _, second = self.api.send(headers={"Idempotency-Key": "k"})
        self.assertNotEqual(first["submission_id"], second["submission_id"])

    def test_idempotency_keys_are_per_client(self) -> None:
        _, first = self.api.send(headers={"Idempotency-Key": "k"})
        code, second = self.api.send(client=OTHER_CLIENT, headers={"Idempotency-Key": "k"}, body="other")
        self.assertEqual(code, 200)
        self.assertNotEqual(first["submission_id"], second["submission_id"])

    def test_bad_idempotency_key_is_400(self) -> None:
        code, body = self.api.send(headers={"Idempotency-Key": "x" * 256})
        self.assertEqual(code, 400)
        self.assertIn("Idempotency-Key", body["message"])


class ErrorTests(SynchronousTestCase):
    """Every error is JSON with the right code, and changes nothing."""

    def setUp(self) -> None:
        self.api, self.store, self.clock = make_api(self, max_recipients=3, max_message_size=2048)

    def assertError(self, response: tuple[int, dict], code: int, *words: str) -> None:
        self.assertEqual(response[0], code, response[1])
        self.assertEqual(set(response[1]), {"result", "message"})
        self.assertEqual(response[1]["result"], "error")
        for word in words:
            self.assertIn(word, response[1]["message"])
        self.assertEqual(result(self, self.store.claim("t", self.clock.seconds() + 1e6, 60, 100)), [])

    def test_malformed_json(self) -> None:
        self.assertError(self.api.request("POST", "/send", raw=b'{"client_id": '), 400, "JSON")

    def test_not_utf8(self) -> None:
        self.assertError(self.api.request("POST", "/send", raw=b'{"a": "\xff"}'), 400, "UTF-8")

    def test_not_an_object(self) -> None:
        self.assertError(self.api.request("POST", "/send", raw=b"[]"), 400, "object")

    def test_nan(self) -> None:
        raw = b'{"client_id": "%s", "x": NaN}' % CLIENT.encode()
        self.assertError(self.api.request("POST", "/send", raw=raw), 400, "NaN")

    def test_duplicate_keys(self) -> None:
        raw = b'{"client_id": "%s", "client_id": "%s"}' % (CLIENT.encode(), CLIENT.encode())
        self.assertError(self.api.request("POST", "/send", raw=raw), 400, "duplicate")

    def test_deep_nesting(self) -> None:
        for depth in (33, 900):
            raw = b'{"client_id": "%s", "x": %s%s}' % (CLIENT.encode(), b"[" * depth, b"]" * depth)
            self.assertError(self.api.request("POST", "/send", raw=raw), 400, "nested")

    def test_unknown_field_named(self) -> None:
        self.assertError(self.api.send(subjet="typo"), 400, "subjet")

    def test_missing_field_named(self) -> None:
        body = {"client_id": CLIENT, "sender": "a@b.example", "recipients": ["c@d.example"], "body": "x"}
        self.assertError(self.api.request("POST", "/send", body), 400, "subject")

    def test_invalid_sender(self) -> None:
        for bad in ("nobody", "a b@c.example", "Alice <a@b.example> trailing", "Alice <a@b.example\r\n>", "a@b.example\r\nBcc: x@y.example", "a@", "@b.example", "a@b", "a@-b.example", "a\x00@b.example", 7):
            self.assertError(self.api.send(sender=bad), 400, "sender")

    def test_invalid_recipient_named_with_index(self) -> None:
        self.assertError(self.api.send(recipients=["ok@b.example", "bad"]), 400, "recipients[1]")

    def test_recipients_must_be_nonempty_list(self) -> None:
        self.assertError(self.api.send(recipients=[]), 400, "recipients")
        self.assertError(self.api.send(recipients="a@b.example"), 400, "recipients")

    def test_too_many_recipients(self) -> None:
        self.assertError(self.api.send(recipients=[f"u{i}@b.example" for i in range(4)]), 400, "more than 3")

    def test_subject_with_newline(self) -> None:
        self.assertError(self.api.send(subject="hi\r\nBcc: victim@x.example"), 400, "subject")

    def test_body_must_be_string(self) -> None:
        self.assertError(self.api.send(body=["x"]), 400, "body")

    def test_missing_client_id_is_401(self) -> None:
        self.assertError(self.api.request("POST", "/send", {"sender": "a@b.example"}), 401, "authentication failed")

    def test_unknown_client_id_is_401(self) -> None:
        self.assertError(self.api.send(client="not-a-client-xxxxxxxx"), 401, "authentication failed")

    def test_unknown_submission_is_404(self) -> None:
        self.assertError(self.api.status("0" * 32), 404, "no such submission")
        self.assertError(self.api.status("not-an-id"), 404, "no such submission")

    def test_other_clients_submission_is_404_with_same_body(self) -> None:
        _, sent = self.api.send()
        theirs = self.api.status(sent["submission_id"], client=OTHER_CLIENT)
        unknown = self.api.status("0" * 32, client=OTHER_CLIENT)
        self.assertEqual(theirs, unknown)

    def test_status_unknown_field(self) -> None:
        code, body = self.api.request("POST", "/status", {"client_id": CLIENT, "submission_id": "0" * 32, "x": 1})
        self.assertEqual((code, "'x'" in body["message"]), (400, True))

    def test_wrong_method_is_405(self) -> None:
        self.assertError(self.api.request("GET", "/send"), 405, "GET")
        self.assertError(self.api.request("PUT", "/status"), 405, "PUT")

    def test_unknown_path_is_404(self) -> None:
        self.assertError(self.api.request("GET", "/nope"), 404, "endpoint")

    def test_body_over_limit_is_413(self) -> None:
        self.assertError(self.api.send(body="x" * 4000), 413, "2048")

    def test_store_failure_is_500_without_internals(self) -> None:
        async def broken(submission: object) -> str:
            raise RuntimeError("secret internals /var/db")

        self.store.add_submission = broken  # type: ignore[method-assign]
        code, body = self.api.send()
        self.assertEqual((code, body), (500, {"result": "error", "message": "internal error"}))
        self.flushLoggedErrors(RuntimeError)


class IndexTests(SynchronousTestCase):
    def test_index_describes_api(self) -> None:
        api, _, _ = make_api(self)
        code, body = api.request("GET", "/")
        self.assertEqual(code, 200)
        self.assertEqual((body["service"], body["api_version"]), ("mmgun", "1"))


class DirectSendTests(SynchronousTestCase):
    """POST /send answered by the root resource, written to the request directly."""

    def request(self) -> Any:
        from io import BytesIO

        from twisted.web.test.requesthelper import DummyRequest

        class SendRequest(DummyRequest):
            # Read by the frontend; DummyRequest does not declare them.
            path: bytes
            content: BytesIO

        request = SendRequest([b"send"])
        request.method, request.path = b"POST", b"/send"
        body = {"client_id": CLIENT, "sender": "me@example.com", "recipients": ["a@b.example"], "subject": "s", "body": "b"}
        request.content = BytesIO(json.dumps(body).encode())
        return request

    def test_client_gone_before_the_commit(self) -> None:
        """Nothing is written to a request whose connection closed while the store committed; the submission stays."""
        from twisted.internet.defer import Deferred
        from twisted.python.failure import Failure
        from twisted.web.server import NOT_DONE_YET

        api, store, _ = make_api(self)
        committed: Deferred[str] = Deferred()

        async def add_submission(submission: object) -> str:
            return await committed

        patched = self.patch(store, "add_submission", add_submission)
        request = self.request()
        frontend = api.frontend
        self.assertIs(frontend.resource().render(request), NOT_DONE_YET)
        request.processingFailed(Failure(ConnectionDone("client went away")))
        committed.callback("f" * 32)
        self.assertEqual((request.written, request.finished), ([], 0))
        # The same request on a live connection is answered.
        patched.restore()
        request = self.request()
        frontend.resource().render(request)
        self.assertEqual((request.responseCode, request.finished), (200, 1))
        self.assertEqual(json.loads(b"".join(request.written))["result"], "queued")


def _mailgun_shape(message: str) -> dict[str, Any]:
    return {"message": message}


class RoutingTests(SynchronousTestCase):
    """issue 12 (frontend): one route per endpoint; the Mailgun v3 API, a Klein app mounted under /v3/, answers errors in its own shape."""

    def setUp(self) -> None:
        import base64

        from mmgun.auth import key_hash, new_key

        from .test_mailgun_api import like_the_frontend

        self.api, self.store, self.clock = make_api(self)
        result(self, self.store.add_client("acme", self.clock.seconds()))
        key_id, key = new_key()
        result(self, self.store.add_key("acme", key_id, key_hash(key), self.clock.seconds()))
        # issue 13: /v3/{domain} is one of the client's sending domains.
        for domain in ("mg.example", "other.example", "bad.example"):
            result(self, self.store.add_domain(domain, "acme", self.clock.seconds()))
        self.auth = {"Authorization": "Basic " + base64.b64encode(f"api:{key}".encode()).decode()}
        self.treq = like_the_frontend(self.api.treq)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        d = self.treq.request(method, "http://mmgun.test" + path, data=body, headers={**self.auth, **(headers or {})})  # type: ignore[attr-defined]
        self.treq.flush()
        response = self.successResultOf(d)
        return response.code, json.loads(self.successResultOf(response.content())), response.headers

    def form(self, domain: str) -> tuple[bytes, dict[str, str]]:
        body = f"from=ada%40{domain}&to=b%40x.example&subject=s&text=t".encode()
        return body, {"Content-Type": "application/x-www-form-urlencoded"}

    def rejected(self) -> dict[str, float]:
        return {
            sample.labels["reason"]: sample.value
            for metric in self.api.frontend.metrics.rejected.collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        }

    def test_a_path_routed_twice_is_refused(self) -> None:
        """issue 12 (frontend, one path per endpoint): a table routing one path twice does not build, nor one with a pattern."""
        from mmgun.web.app import Root, Route

        async def handler(request: Any) -> bytes:
            return b""

        routes = [Route("/send", {b"POST": handler}, _mailgun_shape), Route("/send", {b"GET": handler}, _mailgun_shape)]
        with self.assertRaises(ValueError):
            Root(routes, [], store=self.store, metrics=self.api.frontend.metrics)
        with self.assertRaises(ValueError):
            Root([Route("/v3/{domain}/messages", {b"POST": handler}, _mailgun_shape)], [], store=self.store, metrics=self.api.frontend.metrics)

    def test_each_endpoint_is_one_route(self) -> None:
        """issue 12 (frontend, one path per endpoint): the JSON API's five routes, /send among them once, and the two mounted v3 ones."""
        self.assertEqual(
            self.api.frontend.resource().operations(),
            {
                ("GET", "/"), ("POST", "/send"), ("POST", "/status"), ("GET", "/healthz"), ("GET", "/metrics"),
                ("POST", "/v3/{domain}/messages"), ("POST", "/v3/{domain}/messages.mime"),
                # issue 14: the event log and the suppression lists.
                ("GET", "/events"), ("GET", "/v3/{domain}/events"), ("GET", "/v3/{domain}/events/{page}"),
                ("GET", "/suppressions"), ("POST", "/suppressions"), ("DELETE", "/suppressions"),
                *((method, "/v3/{domain}/{table}") for method in ("GET", "POST", "DELETE")),
                *((method, "/v3/{domain}/{table}/{address}") for method in ("GET", "DELETE")),
                # issue 14: the domain webhooks.
                *((method, "/v3/domains/{domain}/webhooks") for method in ("GET", "POST")),
                *((method, "/v3/domains/{domain}/webhooks/{webhook}") for method in ("GET", "PUT", "DELETE")),
            },
        )

    def test_second_api_gets_its_path_parameter(self) -> None:
        """issue 12 (frontend ready for a second API): /v3/{domain}/messages reaches its handler with the domain."""
        body, headers = self.form("mg.example")
        code, answer, _ = self.request("POST", "/v3/mg.example/messages", body, headers)
        self.assertEqual((code, answer["message"]), (200, "Queued. Thank you."))
        code, answer, _ = self.request("POST", "/v3/other.example/messages", body, headers)
        self.assertEqual(code, 400)
        self.assertIn("(other.example)", answer["message"])

    def test_second_api_errors_in_its_own_shape(self) -> None:
        """issue 12 (frontend, one place for errors): 400, 401, 405 and 404 under /v3/ in {"message"}; the JSON API keeps its shape."""
        code, body, _ = self.request("POST", "/v3/bad.example/messages", b"")
        self.assertEqual((code, body), (400, {"message": "header 'Content-Type' must be multipart/form-data or application/x-www-form-urlencoded"}))
        code, body, headers = self.request("POST", "/v3/bad.example/messages", b"", {"Authorization": "Basic eA=="})
        self.assertEqual((code, body, headers.getRawHeaders(b"www-authenticate")), (401, {"message": "authentication failed"}, [b'Basic realm="mmgun", charset="UTF-8"']))
        code, body, headers = self.request("GET", "/v3/mg.example/messages")
        self.assertEqual((code, body, headers.getRawHeaders(b"allow")), (405, {"message": "method GET not allowed here"}, [b"POST"]))
        code, body, _ = self.request("POST", "/v3/mg.example/nothing")
        self.assertEqual((code, body), (404, {"message": "no such endpoint"}))
        # The JSON API keeps its own shape beside it.
        code, body, _ = self.request("POST", "/v3x", b"")
        self.assertEqual((code, body), (404, {"result": "error", "message": "no such endpoint"}))
        code, body, _ = self.request("POST", "/send", b"{")
        self.assertEqual((code, body["result"]), (400, "error"))

    def test_rejections_of_submission_endpoints_are_counted_by_reason(self) -> None:
        """issue 12 (frontend): mmgun_submissions_rejected_total counts the errors of both APIs' submission routes, no others."""
        self.request("POST", "/send", b"{")
        self.request("POST", "/send", json.dumps({"sender": "a@b.example"}).encode(), {"Authorization": "Basic eA=="})
        self.request("GET", "/send")
        self.request("POST", "/v3/bad.example/messages", b"")
        self.request("GET", "/v3/mg.example/messages")
        # Not submission endpoints: not counted.
        self.request("POST", "/status", b"{")
        self.request("POST", "/send/", b"{")
        self.request("POST", "/v3/mg.example/nothing", b"")
        self.assertEqual(self.rejected(), {"invalid": 2.0, "unauthorized": 1.0, "method": 2.0})


class UnencodableInputTests(test_mailgun_api.V3Tests):
    """issue 12 review: text that cannot be encoded (lone surrogates, non-UTF-8 URLs) is a 4xx in the area's shape, never a 500 or a logged error."""

    def test_lone_surrogate_in_subject_is_refused_by_check_subject(self) -> None:
        """issue 12 review H1: check_subject, shared by both APIs, refuses a lone surrogate (as _string did only for JSON fields)."""
        from mmgun.message import BadRequest, check_subject

        with self.assertRaises(BadRequest) as caught:
            check_subject("Hi \ud800", "subject")
        self.assertEqual(caught.exception.status, 400)
        self.assertIn("'subject'", str(caught.exception))
        self.assertEqual(check_subject("Hi \u00e9\U0001f600", "subject"), "Hi \u00e9\U0001f600")

    def test_lone_surrogate_through_a_recipient_variable_is_400(self) -> None:
        """issue 12 review H1: a recipient variable "\\ud800" (JSON escape) substituted into the subject is a 400 naming the field; nothing queued, nothing logged."""
        variables = json.dumps({"bob@x.example": {"name": "\ud800"}})
        self.assertIn("\\ud800", variables)  # sent as JSON's escape, which json.loads makes a lone surrogate
        message = self.refused(self.message(subject="Hi %recipient.name%", recipient_variables=variables))
        self.assertIn("'subject'", message)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_status_with_a_lone_surrogate_message_id_is_404(self) -> None:
        """issue 12 review H2: POST /status {"message_id": "\\ud800"} (and other shapes no Message-ID has) is a 404, not a 500 from SQLite's encoder."""
        code, answer = self.post(self.message())
        self.assertEqual(code, 200, answer)
        for message_id in ("\ud800", "<\ud800@x.example>", "<a\ud800@x.example>", "no-at-sign", "<a b@x.example>", "<a@b>>"):
            self.assertEqual(self.status(message_id), (404, {"result": "error", "message": "no such submission"}), repr(message_id))
        self.assertEqual(self.status(answer["id"])[0], 200)
        self.assertEqual(self.status(answer["id"][1:-1])[0], 200)
        self.assertEqual(self.flushLoggedErrors(), [])

    def raw_request(self, path: bytes, host: bytes = b"mmgun.test") -> tuple[int, Any, Any]:
        """A request for ``path`` exactly as given (no client-side URL normalization), through the real Site."""
        from twisted.internet.testing import StringTransport
        from twisted.web.http import HTTPChannel

        site = self.api.frontend.site()
        channel = site.buildProtocol(None)
        assert isinstance(channel, HTTPChannel)
        transport = StringTransport()
        channel.makeConnection(transport)
        body = b"from=ada%40example.com&to=b%40x.example&subject=s&text=t"
        channel.dataReceived(
            b"POST " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n" + b"Authorization: " + basic_header(self.keys["acme"]) + b"\r\n\r\n" + body
        )
        response = transport.value()
        head, _, content = response.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        headers = {line.split(b":", 1)[0].lower(): line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")[1:]}
        channel.connectionLost(Failure(ConnectionDone()))
        return status, content, headers

    def test_non_utf8_path_under_v3_is_404_in_mailguns_shape(self) -> None:
        """issue 12 review M3: /v3/%FF/messages is Mailgun's {"message"} 404 (as the JSON API answers a non-UTF-8 path), not Klein's text/html 400; no error logged; nothing queued."""
        for path in (b"/v3/%FF/messages", b"/v3/example.com/messages%C3", b"/v3/%ED%A0%80/messages.mime"):
            status, content, headers = self.raw_request(path)
            self.assertEqual((status, headers[b"content-type"]), (404, b"application/json"), path)
            self.assertEqual(json.loads(_chunked(content, headers)), {"message": "no such endpoint"}, path)
        # The JSON API's answer to a non-UTF-8 path, for comparison: 404 in its own shape.
        status, content, headers = self.raw_request(b"/%FF")
        self.assertEqual((status, json.loads(_chunked(content, headers))), (404, {"result": "error", "message": "no such endpoint"}))
        # And the same form at a good path is queued.
        self.assertEqual(self.raw_request(b"/v3/example.com/messages")[0], 200)
        self.assertEqual(len(self.queued()), 1)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_non_utf8_host_under_v3_is_400_in_mailguns_shape(self) -> None:
        """issue 12 review M3: a Host header that is not UTF-8 (Klein decodes it too) is a 400 {"message"}; no error logged; nothing queued."""
        status, content, headers = self.raw_request(b"/v3/example.com/messages", host=b"mmgun\xff.test")
        self.assertEqual((status, headers[b"content-type"]), (400, b"application/json"))
        self.assertEqual(json.loads(_chunked(content, headers)), {"message": "header 'Host' is not UTF-8"})
        self.assertEqual(self.queued(), [])
        self.assertEqual(self.flushLoggedErrors(), [])


def basic_header(key: str) -> bytes:
    return test_mailgun_api.basic(key)["Authorization"].encode()


def _chunked(content: bytes, headers: dict[bytes, bytes]) -> bytes:
    """The body of an HTTP/1.1 response, chunked or not."""
    if headers.get(b"transfer-encoding") != b"chunked":
        return content
    out = b""
    while True:
        size_line, _, content = content.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out += content[:size]
        content = content[size + 2 :]
