"""
The part of an SMTP session before its mail transactions, on
L{twisted.mail.smtp.ESMTPClient}: reading replies, the greeting, EHLO (with
the HELO fallback) and STARTTLS. What the stock client gets wrong for us, and
is replaced here:

    - C{lineReceived} accepts anything C{int()} parses as a code and buffers
      continuation lines without limit;
    - after a refused HELO the client sends HELO again, for ever;
    - C{tryTLS} looks for C{b"STARTTLS"} case-sensitively (RFC 5321 4.1.1.1:
      EHLO keywords are case-insensitive), and there is no SMTP AUTH here;
    - data received behind the 220 to STARTTLS would be read as if it came
      over TLS (response injection, cf. CVE-2011-0411).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from typing import Literal

from twisted.internet.interfaces import IDelayedCall, IOpenSSLClientConnectionCreator, IReactorTime, ITLSTransport
from twisted.mail.smtp import ESMTPClient

from .outcome import CONTROL, Reply, parse_reply
from .settings import SMTPSettings, TLSMode
from .wire import Extensions

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])(?:([ -])(.*))?", re.DOTALL)

# A reply longer than this is hostile or broken; SMTPClient would buffer it
# without limit.
_MAX_REPLY_LINES = 100

Then = Literal["quit", "close", "abort", "nothing", "park"]


class Phase(enum.Enum):
    """Where the session is, outside a mail transaction; the value is used in synthesized replies."""

    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    TLS = "TLS handshake"
    MAIL = "MAIL FROM"
    QUIT = "QUIT"
    IDLE = "idle"


class Handshake(ESMTPClient):
    """
    Greets, says EHLO (or HELO), and does STARTTLS as C{settings.tls} says; then
    calls C{smtpState_from}, where the subclass starts its mail transactions with
    C{self._extensions} set from the last EHLO reply. Replies come to
    L{replyReceived}; the subclass gives up the session with C{_finish}.

    ESMTPClient routes every attribute assignment into the instance dict, so
    this class keeps to plain attributes.
    """

    debug = False  # SMTPClient would otherwise keep a transcript in self.log

    def __init__(
        self, *, clock: IReactorTime, host: str, settings: SMTPSettings, tls: IOpenSSLClientConnectionCreator | None
    ) -> None:
        super().__init__(None, tls, settings.helo)
        # ESMTPClient declares C{context = None}; this is the same object, typed.
        self._tls = tls
        self._clock = clock
        self._host = host
        self._settings = settings
        self.requireTransportSecurity = settings.tls is not TLSMode.OPPORTUNISTIC
        self._phase = Phase.GREETING
        self._reply_lines: list[bytes] = []
        self._extensions = Extensions()

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        # TimeoutMixin's clock: the injected one, not the global reactor.
        return self._clock.callLater(period, func)

    def _finish(self, reason: Reply | None, *, then: Then = "nothing", tls_failed: bool = False) -> None:
        raise NotImplementedError

    def _protocol_error(self, detail: str) -> None:
        raise NotImplementedError

    def replyReceived(self, code: int, resp: bytes) -> None:
        """A whole reply: its code and its text lines joined by "\\n"."""
        self._dispatch(code, resp)

    def _dispatch(self, code: int, resp: bytes) -> None:
        """To the state callbacks of SMTPClient, as its own lineReceived would."""
        if code in self._expected:
            self._okresponse(code, resp)
        else:
            self._failresponse(code, resp)

    def lineReceived(self, line: bytes) -> None:
        """Replaces SMTPClient.lineReceived: a strict reply syntax, and a bound on multi-line replies."""
        self.resetTimeout()
        match = _REPLY_LINE.fullmatch(line)
        if match is None:
            self._protocol_error("malformed reply")
            return
        self._reply_lines.append(match.group(3) or b"")
        if match.group(2) == b"-":
            if len(self._reply_lines) > _MAX_REPLY_LINES:
                self._protocol_error("overlong multi-line reply")
            return
        resp = b"\n".join(self._reply_lines)
        self._reply_lines = []
        self.replyReceived(int(match.group(1)), resp)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._protocol_error("overlong reply line")

    def smtpConnectionFailed(self, code: int, resp: bytes) -> None:
        # A greeting other than 220.
        self._finish(parse_reply(code, resp), then="quit")

    def esmtpState_ehlo(self, code: int, resp: bytes) -> None:
        self._phase = Phase.EHLO
        super().esmtpState_ehlo(code, resp)

    def smtpState_helo(self, code: int, resp: bytes) -> None:
        self._phase = Phase.HELO
        self._extensions = Extensions()
        super().smtpState_helo(code, resp)
        # Left alone, a refused HELO would be answered with another HELO.
        self._failresponse = self._helo_refused

    def _helo_refused(self, code: int, resp: bytes) -> None:
        self._finish(parse_reply(code, resp), then="quit")

    def esmtpEHLORequired(self, code: int = -1, resp: bytes | None = None) -> None:
        # EHLO refused while TLS is required: no STARTTLS without EHLO.
        refusal = parse_reply(code, resp or b"")
        self._finish(Reply(421, f"4.7.0 {self._host} refused EHLO ({refusal}); TLS is required"), then="quit")

    def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
        """EHLO accepted. Replaces ESMTPClient's tryTLS/authenticate (see the module's docstring)."""
        lines = resp.split(b"\n")[1:]
        keywords = {line.split(None, 1)[0].upper() for line in lines if line.strip()}
        self._extensions = Extensions.from_ehlo(lines)
        if self._tlsMode or self._tls is None:
            self.smtpState_from(code, resp)
        elif b"STARTTLS" in keywords:
            self._phase = Phase.STARTTLS
            self._expected = [220]
            self._okresponse = self.esmtpState_starttls
            self._failresponse = self.esmtpTLSFailed
            self.sendLine(b"STARTTLS")
        elif self.requireTransportSecurity:
            self.esmtpTLSRequired()
        else:
            self.smtpState_from(code, resp)

    def esmtpTLSRequired(self, code: int = -1, resp: bytes | None = None) -> None:
        self._finish(Reply(421, f"4.7.0 {self._host} does not offer STARTTLS; TLS is required"), then="quit")

    def esmtpTLSFailed(self, code: int = -1, resp: bytes | None = None) -> None:
        # STARTTLS refused (e.g. 454).
        if self.requireTransportSecurity:
            refusal = parse_reply(code, resp or b"")
            self._finish(Reply(421, f"4.7.0 {self._host} refused STARTTLS ({refusal}); TLS is required"), then="quit")
        else:
            # RFC 3207 4: the session may go on in clear after a refusal.
            self.smtpState_from(code, resp)

    def esmtpState_starttls(self, code: int, resp: bytes) -> None:
        # Anything already received after the 220 came in clear text but
        # would be read as if it came over TLS (response injection, cf.
        # CVE-2011-0411 and "NO STARTTLS", USENIX Security 2021).
        if self.clearLineBuffer():
            self._tls_failed("clear-text data after the STARTTLS reply")
            return
        self._phase = Phase.TLS
        # RFC 3207 4.2: forget what the clear-text EHLO reply said.
        self._extensions = Extensions()
        try:
            assert self._tls is not None, "STARTTLS is only sent with a TLS context"
            ITLSTransport(self.transport).startTLS(self._tls)
        except Exception as e:
            self._tls_failed(str(e))
            return
        self._tlsMode = True
        self.esmtpState_ehlo(code, resp)
        # Until the reply to this EHLO arrives, a lost connection means the
        # handshake failed.
        self._phase = Phase.TLS

    def _tls_failed(self, detail: str) -> None:
        # The detail may quote what the peer sent (an alert, a certificate name).
        detail = CONTROL.sub(" ", detail)
        self._finish(Reply(421, f"4.7.5 TLS with {self._host} failed: {detail}"), then="abort", tls_failed=True)
