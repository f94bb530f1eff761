"""How the SMTP client behaves: L{SMTPSettings}, and L{TLSMode} for STARTTLS."""

from __future__ import annotations

import enum

import attrs

__all__ = ["SMTPSettings", "TLSMode"]


class TLSMode(enum.Enum):
    """
    What to do about STARTTLS (RFC 3207).

    OPPORTUNISTIC: encrypt when the server offers it, without checking its
    certificate (RFC 7435); plain text when it doesn't or refuses STARTTLS,
    and a second connection in plain text when the connection dies during
    STARTTLS or the TLS handshake.
    REQUIRE: never send in clear; the certificate is not checked.
    VERIFY: REQUIRE, plus the certificate must be valid for the MX host name.
    """

    OPPORTUNISTIC = "opportunistic"
    REQUIRE = "require"
    VERIFY = "verify"


@attrs.frozen
class SMTPSettings:
    """
    @ivar helo: our name for EHLO/HELO.
    @ivar command_timeout: seconds to wait for any reply (and for progress
        while sending the body).
    @ivar data_timeout: seconds to wait for the reply to the final "."
        (RFC 5321 4.5.3.2.6 says at least 10 minutes).
    @ivar trust_root: an L{IOpenSSLTrustRoot} for L{TLSMode.VERIFY};
        C{None} means the platform's trust store.
    """

    helo: str
    tls: TLSMode = TLSMode.OPPORTUNISTIC
    command_timeout: float = 300.0
    connect_timeout: float = 30.0
    data_timeout: float = 600.0
    trust_root: object = None
