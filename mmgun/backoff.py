"""
Destination back-off: how hard the sender may push each mail exchanger and each recipient
domain, from what they answer (issue 18) — Postfix's destination concurrency feedback, and
a pause for receivers that say they are rate-limiting us.

Two kinds of feedback, from one pure classifier of replies (:func:`classify`):

- **Per MX address: concurrency.** Each address starts at ``maximum``
  (``--max-per-destination``: no slow start). A 421 (greeting or any command), a refused
  connection or a timeout lowers it by one, down to 1; a transaction the MX saw through
  (whatever it answered) counts towards raising it again, by one per ``limit`` of them
  (Postfix's 1/concurrency positive feedback), up to ``maximum``. Sessions already running
  when it drops go on; new ones wait (:class:`ConcurrencyLimit`). A lowered limit whose MX
  has seen no session for :data:`MX_MEMORY` starts again at ``maximum``.
- **Per recipient domain: a pause.** A reply saying the receiver is rate-limiting us
  (``421 4.7.28``, ``450 4.7.1 … rate``, ``451 4.7.1 … try again later``, ``421 … too many
  connections``, Yahoo's ``[TSS04]``, Outlook's ``4.7.650``…) pauses the whole domain for
  ``pause`` (``--destination-pause``), doubling at each pause that follows another without
  a delivery in between, up to :data:`PAUSE_CAP` times ``pause``; a delivery (2xx) after
  the pause resets it, and so does a quiet time as long as that cap after the pause's end.
  Replies that come while a pause is on (sessions that were already under way) neither
  extend nor grow it. Every stored pause of a domain counts, whichever sender wrote it.

Only a reply the peer really sent is read for its words: one mmgun made up itself (a
refused, timed-out or lost connection, a TLS or MTA-STS failure) names hosts and domains,
and goes by its codes alone; a connection or system overload code (4.4.x, 4.3.2) means an
overload whatever the text. What is remembered per address and domain is swept
(:meth:`Backoff.sweep`) once idle, so mail to ever new destinations does not grow it.

Nothing here does I/O or reads a clock: times are given (wall-clock seconds, as stored),
and what changed is collected for the caller to write to the store
(:meth:`Backoff.changes`) — on change, not per message — so that other senders honour
a pause (:meth:`Backoff.others`) and ``mmgun stats`` shows it.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Iterable

import attrs
from twisted.internet.defer import Deferred, succeed

from .store import Backoff as BackoffEntry

#: A pause grows (doubles) at most to this many times --destination-pause.
PAUSE_CAP = 16
#: A lowered MX concurrency is forgotten (back to the maximum) after this long without a
#: change while no session to it runs; its row in the store expires then too.
MX_MEMORY = 600.0


class Signal(enum.StrEnum):
    """What one reply says about the load the receiver takes from us."""

    #: 2xx: delivered. The MX coped; the domain is not rate-limiting us.
    DELIVERED = "delivered"
    #: Says nothing about load (a refused address or message, a TLS policy failure, greylisting).
    NEUTRAL = "neutral"
    #: 421, a refused connection, a timeout: the MX is overloaded — fewer sessions to it.
    OVERLOADED = "overloaded"
    #: The receiver is throttling us: pause the domain (and fewer sessions to the MX).
    RATE_LIMITED = "rate-limited"


#: Enhanced status codes (RFC 3463) that mean "you are sending too fast" whatever the text.
RATE_LIMIT_CODES = frozenset({"4.7.28", "4.7.500", "4.7.650"})
#: Enhanced status classes about one mailbox, address, message or the protocol (4.5.3:
#: too many recipients): never a domain's rate limit, whatever the text says (Gmail's "450
#: 4.2.1 … receiving mail at a rate that prevents additional messages" is one mailbox's).
PER_MESSAGE_CLASSES = ("4.1.", "4.2.", "4.5.", "4.6.")
#: Enhanced status codes of a connection that failed, timed out or a system too busy.
OVERLOAD_CODES = frozenset({"4.4.1", "4.4.2", "4.3.2", "4.4.5"})
_ENHANCED = re.compile(r"\s*([245]\.\d{1,3}\.\d{1,3})\b")
_GREYLISTING = re.compile(r"gr[ea]y-?list", re.IGNORECASE)
_RATE_TEXT = re.compile(
    r"rate[- ]?limit|\bthrottl|\brate\b|\[?TSS\d\d\]?"
    r"|too many (?:\w+ ){0,2}(?:connections|sessions|messages|mails|e-?mails|requests)",
    re.IGNORECASE,
)
_TRY_LATER = re.compile(r"try (?:again )?later", re.IGNORECASE)


def enhanced_code(text: str) -> str | None:
    """The RFC 3463 enhanced status code at the start of a reply's text, if any."""
    match = _ENHANCED.match(text)
    return match.group(1) if match else None


def classify(code: int, text: str, *, received: bool) -> Signal:
    """
    What a reply (``code``, and its ``text`` without the code) says: by the enhanced status
    code first, by the text only where the code does not decide. Permanent (5xx) replies
    never pause anything: they end the recipient's delivery anyway.

    ``received``: the peer's own reply (:attr:`mmgun.smtp.Reply.received`). The text of one
    mmgun made up (a refused or timed-out connection, a TLS or MTA-STS failure, a lost
    connection) names hosts and domains — ``mx.first-rate.example`` — and is never read:
    such a reply is judged by its codes alone.
    """
    if 200 <= code < 300:
        return Signal.DELIVERED
    if not 400 <= code < 500:
        return Signal.NEUTRAL
    enhanced = enhanced_code(text)
    if enhanced in OVERLOAD_CODES:
        # A failed or timed-out connection, a system too busy: whatever the text says.
        return Signal.OVERLOADED
    if enhanced in RATE_LIMIT_CODES:
        return Signal.RATE_LIMITED
    if enhanced is not None and enhanced.startswith(PER_MESSAGE_CLASSES):
        return Signal.OVERLOADED if code == 421 else Signal.NEUTRAL
    if enhanced is not None and enhanced.startswith("4.7.") and not received:
        return Signal.NEUTRAL  # mmgun's own TLS and MTA-STS failures: not the MX's load
    if received:
        if _GREYLISTING.search(text):
            return Signal.NEUTRAL
        if _RATE_TEXT.search(text):
            return Signal.RATE_LIMITED
        if enhanced is not None and enhanced.startswith("4.7."):
            # Security or policy (RFC 3463): "try again later" there is throttling; anything
            # else (TLS required, a policy refusal) is not the MX's load.
            return Signal.RATE_LIMITED if _TRY_LATER.search(text) else Signal.NEUTRAL
    return Signal.OVERLOADED if code == 421 else Signal.NEUTRAL


def worst(signals: Iterable[Signal]) -> Signal:
    """The signal that matters most among several (one transaction's replies): rate limit, overload, delivered, neutral."""
    found = set(signals)
    for signal in (Signal.RATE_LIMITED, Signal.OVERLOADED, Signal.DELIVERED):
        if signal in found:
            return signal
    return Signal.NEUTRAL


class ConcurrencyLimit:
    """
    An MX address's adaptive session limit: a semaphore whose size follows feedback.
    Lowering it cuts no session already running; waiters start as slots free up.
    """

    def __init__(self, maximum: int, label: str) -> None:
        self.maximum = maximum
        self.limit = maximum
        #: What the store and ``mmgun stats`` call it: "name [address]".
        self.label = label
        self.active = 0
        #: When (wall clock) the limit last changed.
        self.changed_at = 0.0
        #: The reply that last lowered it.
        self.reply = ""
        self._successes = 0
        self._waiting: deque[Deferred[None]] = deque()

    @property
    def idle(self) -> bool:
        return self.active == 0 and not self._waiting

    @property
    def full(self) -> bool:
        """Whether :meth:`acquire` would wait now."""
        return self.active >= self.limit or bool(self._waiting)

    def acquire(self) -> Deferred[None]:
        """A slot: at once while fewer than ``limit`` sessions run, else when one frees up (cancellable)."""
        if self.active < self.limit and not self._waiting:
            self.active += 1
            return succeed(None)
        d: Deferred[None] = Deferred(self._waiting.remove)
        self._waiting.append(d)
        return d

    def release(self) -> None:
        self.active -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiting and self.active < self.limit:
            self.active += 1
            self._waiting.popleft().callback(None)

    def lower(self, reply: str, now: float) -> bool:
        """Negative feedback: one session fewer, down to 1. True when the limit changed."""
        self._successes = 0
        self.reply = reply
        if self.limit <= 1:
            return False
        self.limit -= 1
        self.changed_at = now
        return True

    def succeeded(self, now: float) -> bool:
        """Positive feedback: one session more per ``limit`` of these, up to the maximum. True when the limit changed."""
        if self.limit >= self.maximum:
            return False
        self._successes += 1
        if self._successes < self.limit:
            return False
        self._successes = 0
        self.limit += 1
        self.changed_at = now
        self._wake()
        return True


@attrs.define
class _Pause:
    until: float
    reply: str
    #: Pauses in a row without a delivery in between: the next lasts pause × 2**strikes.
    strikes: int


class Backoff:
    """One sender's destination feedback: MX concurrency limits and domain pauses, and the changes to store."""

    def __init__(self, maximum: int, pause: float, sender: str) -> None:
        """``maximum``: --max-per-destination; ``pause``: --destination-pause (0: never pause); ``sender``: our identity, as stored."""
        self.maximum = maximum
        self.pause = pause
        self.sender = sender
        self._limits: dict[str, ConcurrencyLimit] = {}
        self._pauses: dict[str, _Pause] = {}
        #: The pauses stored (:meth:`others`), ours included: domain → (until, reply).
        self._others: dict[str, tuple[float, str]] = {}
        self._changes: dict[tuple[str, str], BackoffEntry] = {}

    # -- MX concurrency ----------------------------------------------------------

    def limit(self, address: str, label: str, now: float) -> ConcurrencyLimit:
        """The session limit of an MX address (made at the maximum, or made again if forgotten)."""
        limit = self._limits.get(address)
        if limit is not None and limit.idle and limit.limit < self.maximum and now - limit.changed_at >= MX_MEMORY:
            del self._limits[address]
            limit = None
        if limit is None:
            limit = self._limits[address] = ConcurrencyLimit(self.maximum, label)
        return limit

    def concurrency(self, address: str) -> int:
        """The session limit of an MX address now."""
        limit = self._limits.get(address)
        return limit.limit if limit is not None else self.maximum

    @property
    def size(self) -> int:
        """How many MX addresses and recipient domains it remembers (what :meth:`sweep` keeps small)."""
        return len(self._limits) + len(self._pauses) + len(self._others)

    def sweep(self, now: float) -> None:
        """
        Forget what no longer matters, so that mail to ever new addresses and domains does
        not grow the tables: idle MX limits back at the maximum or unchanged for
        :data:`MX_MEMORY` (as :meth:`limit` would on reuse), pauses over for as long as
        their growth is remembered, stored pauses that have ended.
        """
        for address, limit in list(self._limits.items()):
            if limit.idle and (limit.limit >= self.maximum or now - limit.changed_at >= MX_MEMORY):
                del self._limits[address]
        quiet = self.pause * PAUSE_CAP
        for domain in [name for name, old in self._pauses.items() if now >= old.until + quiet]:
            del self._pauses[domain]
        for domain in [name for name, (until, _) in self._others.items() if now >= until]:
            del self._others[domain]

    def done_with(self, address: str) -> None:
        """Forget an idle address at its maximum: nothing to remember about it."""
        limit = self._limits.get(address)
        if limit is not None and limit.idle and limit.limit >= self.maximum:
            del self._limits[address]

    def session_feedback(self, address: str, signal: Signal, reply: str, now: float) -> None:
        """One transaction's (or a failed session's) worst signal, for the MX at ``address``."""
        limit = self._limits.get(address)
        if limit is None:
            return
        if signal in (Signal.OVERLOADED, Signal.RATE_LIMITED):
            if limit.lower(reply, now):
                self._mx_changed(limit, now)
        elif limit.succeeded(now):
            self._mx_changed(limit, now)

    def _mx_changed(self, limit: ConcurrencyLimit, now: float) -> None:
        lowered = limit.limit < limit.maximum
        # Back at the maximum: the stored row ends now (shown no more).
        until = now + MX_MEMORY if lowered else now
        self._changes[("mx", limit.label)] = BackoffEntry(
            "mx", limit.label, self.sender, until, limit.reply, concurrency=limit.limit, updated_at=now
        )

    # -- domain pauses -----------------------------------------------------------

    def domain_feedback(self, domain: str, signal: Signal, reply: str, now: float) -> float | None:
        """
        A reply for mail to ``domain``: a rate limit pauses it (returns the pause's end when
        one begins); a delivery after a pause resets its growth.
        """
        pause = self._pauses.get(domain)
        if signal is Signal.DELIVERED:
            if pause is not None and now >= pause.until:
                del self._pauses[domain]
            return None
        if signal is not Signal.RATE_LIMITED or self.pause <= 0:
            return None
        if pause is not None and now < pause.until:
            return None  # already paused: sessions under way when it began say so too
        # Pauses long over are forgotten: the next one starts short again.
        quiet = self.pause * PAUSE_CAP
        for name in [name for name, old in self._pauses.items() if now >= old.until + quiet]:
            del self._pauses[name]
        pause = self._pauses.get(domain)
        strikes = pause.strikes + 1 if pause is not None else 0
        until = now + self.pause * min(2**strikes, PAUSE_CAP)
        self._pauses[domain] = _Pause(until, reply, strikes)
        self._changes[("domain", domain)] = BackoffEntry("domain", domain, self.sender, until, reply, updated_at=now)
        return until

    def paused(self, domain: str, now: float) -> tuple[float, str] | None:
        """(until, reply) while ``domain`` is paused, by us or by another sender; else None."""
        found: tuple[float, str] | None = None
        pause = self._pauses.get(domain)
        if pause is not None and now < pause.until:
            found = (pause.until, pause.reply)
        other = self._others.get(domain)
        if other is not None and now < other[0] and (found is None or other[0] > found[0]):
            found = other
        return found

    def others(self, entries: Iterable[BackoffEntry]) -> None:
        """
        What the store holds now: its domain pauses replace those read before. Every row
        counts, whoever wrote it (the latest end of each domain's): processes sharing a
        ``--sender-id`` write under the same name, and one's pause holds the other's mail too.
        """
        self._others = {}
        for entry in entries:
            if entry.kind == "domain":
                known = self._others.get(entry.name)
                if known is None or entry.until > known[0]:
                    self._others[entry.name] = (entry.until, entry.reply)

    # -- to the store ------------------------------------------------------------

    def changes(self) -> list[BackoffEntry]:
        """What changed since the last call, to write to the store (each entry its latest state)."""
        changes, self._changes = list(self._changes.values()), {}
        return changes
