"""
issue 14 (webhooks), a real consumer: django-anymail's ``MailgunTrackingWebhookView`` — the
Mailgun tracking webhook that many Django applications already run — served over real HTTP
(Django's WSGI application in twisted.web's WSGI container, on 127.0.0.1) and fed by mmgun's
dispatcher with real events. Anymail checks the Basic-auth secret of the URL and the
signature with the client's webhook signing key, and turns each POST into its normalized
tracking event: what an application sees must be right.
"""

from __future__ import annotations

from typing import Any

import django
import django.conf
from django.urls import path
from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool
from twisted.web.wsgi import WSGIResource

from .test_webhook_dispatch import DispatchCase

#: The URL's Basic-auth pair: anymail's WEBHOOK_SECRET.
SECRET = "anymail:s3cret-pa55"
#: The client's webhook signing key, as anymail is configured with it.
_KEY: dict[str, str] = {}
#: What anymail's tracking signal delivered: (normalized event, the raw esp_event).
SEEN: list[Any] = []


def _view(request: Any) -> Any:
    from anymail.webhooks.mailgun import MailgunTrackingWebhookView

    view = MailgunTrackingWebhookView.as_view(webhook_signing_key=_KEY["key"])
    return view(request)


urlpatterns = [path("anymail/mailgun/tracking/", _view)]


def _setup_django() -> None:
    # django.conf.settings is not bound to a name here: trial looks at every name of a module.
    if django.conf.settings.configured:
        return
    django.conf.settings.configure(
        DEBUG=False,
        SECRET_KEY="mmgun-test",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=["anymail"],
        MIDDLEWARE=[],
        USE_TZ=True,
        ANYMAIL={"WEBHOOK_SECRET": SECRET},
    )
    django.setup()
    from anymail.signals import tracking

    def record(sender: Any, event: Any, esp_name: str, **kwargs: Any) -> None:
        SEEN.append(event)

    tracking.connect(record, weak=False, dispatch_uid="mmgun-test")


class AnymailTests(DispatchCase):
    def setUp(self) -> None:
        super().setUp()
        _setup_django()
        del SEEN[:]
        from django.core.wsgi import get_wsgi_application

        pool = ThreadPool(minthreads=1, maxthreads=2, name="anymail-test")
        pool.start()
        self.addCleanup(pool.stop)
        self.requests: list[Any] = []
        # WSGIResource provides IResource without deriving from Resource.
        _, port = self.receivers.web(WSGIResource(reactor, pool, get_wsgi_application()))  # type: ignore[arg-type]
        self.url = f"http://{SECRET}@127.0.0.1:{port}/anymail/mailgun/tracking/"

    async def test_anymail_accepts_and_understands_every_kind(self) -> None:
        """issue 14 (webhooks): anymail takes mmgun's delivered, temporary_fail and permanent_fail POSTs as Mailgun's."""
        self.webhook(self.url)
        self.mail(
            {"ann@x.example": ("sent", "250 2.0.0 queued as 1"), "bob@x.example": ("deferred", "451 4.7.1 greylisted")},
        )
        self.mail({"cat@y.example": ("failed", "550 5.1.1 no such user")})
        _KEY["key"] = await self.store.set_webhook_key("acme", "0123456789abcdef" * 4, self.clock.seconds())
        dispatcher = self.dispatcher(allow_private=True)
        await dispatcher.settled()
        self.assertEqual(self.retries(), [], "anymail refused a POST")
        by_recipient = {e.recipient: e for e in SEEN}
        self.assertEqual(
            {r: e.event_type for r, e in by_recipient.items()},
            {"ann@x.example": "delivered", "bob@x.example": "deferred", "cat@y.example": "bounced"},
        )
        bounce = by_recipient["cat@y.example"]
        self.assertEqual(bounce.reject_reason, "bounced")
        self.assertIn("5.1.1 no such user", bounce.mta_response)
        delivered = by_recipient["ann@x.example"]
        self.assertTrue(delivered.message_id.startswith("<") and delivered.message_id.endswith("@acme>"))
        self.assertEqual(delivered.timestamp.timestamp(), self.clock.seconds())
        self.assertEqual(len({e.event_id for e in SEEN}), 3)

    async def test_anymail_refuses_a_wrong_key_and_the_event_waits(self) -> None:
        """issue 14 (webhooks): signed with another key, anymail answers 400: the event stays in the retries."""
        self.webhook(self.url)
        self.mail({"ann@x.example": ("sent", "250 2.0.0 ok")})
        await self.store.set_webhook_key("acme", "a" * 64, self.clock.seconds())
        _KEY["key"] = "b" * 64
        dispatcher = self.dispatcher(allow_private=True)
        await dispatcher.settled()
        self.assertEqual(SEEN, [])
        (waiting,) = self.retries()
        self.assertIn("400", waiting.last_error or "")

    async def test_anymail_refuses_a_url_without_its_secret(self) -> None:
        """issue 14 (webhooks): the URL's user:password is what anymail checks: without it (right key), 400 and the event waits."""
        self.webhook(self.url.replace(f"{SECRET}@", ""))
        self.mail({"ann@x.example": ("sent", "250 2.0.0 ok")})
        _KEY["key"] = await self.store.set_webhook_key("acme", "a" * 64, self.clock.seconds())
        dispatcher = self.dispatcher(allow_private=True)
        await dispatcher.settled()
        self.assertEqual(SEEN, [])
        (waiting,) = self.retries()
        self.assertIn("400", waiting.last_error or "")
