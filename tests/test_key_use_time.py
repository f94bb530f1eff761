"""An API key's last use is stored in wall-clock time, though the reactor's clock is monotonic (mmgun.clock)."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mmgun.auth import TOUCH_INTERVAL, key_hash, new_key
from mmgun.clients import Clients
from mmgun.web.app import Frontend

from .helpers import CLIENT, APIClient, result, sync_store

MESSAGE = {"sender": "me@example.com", "recipients": ["a@x.example"], "subject": "s", "body": "b"}
#: Far from the monotonic clock's reading, as after a wall-clock step or with a clock counting from boot.
WALL = 1_800_000_000.0


class LastUsedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store, _ = sync_store(self)
        self.clock = Clock()
        self.clock.advance(5_000)
        self.wall = WALL
        clients = Clients.from_ids([CLIENT])
        frontend = Frontend(self.store, lambda: clients, self.clock, hostname="mmgun.test", wall=lambda: self.wall)
        self.api = APIClient(self, frontend)
        result(self, self.store.add_client("acme", self.wall))
        key_id, self.key = new_key()
        result(self, self.store.add_key("acme", key_id, key_hash(self.key), self.wall))

    def send(self) -> int:
        code, _ = self.api.request("POST", "/send", MESSAGE, headers={"Authorization": f"Bearer {self.key}"})
        return code

    def last_used(self) -> float | None:
        (info,) = result(self, self.store.list_keys("acme"))
        return info.last_used_at

    def test_last_used_is_wall_time(self) -> None:
        """issue 11 item 3: last_used_at is the wall clock's time of use, not the reactor's monotonic seconds."""
        self.wall += 7.5
        self.assertEqual(self.send(), 200)
        self.assertEqual(self.last_used(), WALL + 7.5)

    def test_later_use_after_the_touch_interval(self) -> None:
        """issue 11 item 3: the touch interval runs on the reactor's clock; the time written is the wall's."""
        self.assertEqual(self.send(), 200)
        self.clock.advance(TOUCH_INTERVAL)
        self.wall += 7_200  # the wall clock was stepped forward two hours meanwhile
        self.assertEqual(self.send(), 200)
        self.assertEqual(self.last_used(), WALL + 7_200)
