"""The TLS client side of STARTTLS: verified (L{TLSMode.VERIFY}) or opportunistic."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from OpenSSL import SSL
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS, platformTrust
from zope.interface import implementer

from .settings import SMTPSettings, TLSMode

if TYPE_CHECKING:
    from twisted.internet._sslverify import IOpenSSLTrustRoot


@implementer(IOpenSSLClientConnectionCreator)
class _UnauthenticatedTLS:
    """
    Client TLS that encrypts without checking the server's certificate or
    name: RFC 7435 opportunistic security (and L{TLSMode.REQUIRE}). Sends SNI,
    which some MX hosts use to pick their certificate.
    """

    def __init__(self, hostname: str) -> None:
        self._options = CertificateOptions()  # verify=False
        self._server_name: bytes | None = None
        if hostname.isascii() and not (isIPAddress(hostname) or isIPv6Address(hostname)):
            self._server_name = hostname.encode("ascii")

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._options.getContext(), None)
        if self._server_name:
            connection.set_tlsext_host_name(self._server_name)
        return connection


def tls_creator(settings: SMTPSettings, host: str) -> IOpenSSLClientConnectionCreator:
    """The TLS client for STARTTLS with C{host}, as C{settings.tls} says."""
    # MX names from DNS may be absolute ("mx.example."); certificates and SNI
    # never carry the trailing dot.
    name = host.rstrip(".")
    if settings.tls is TLSMode.VERIFY:
        trust_root = settings.trust_root if settings.trust_root is not None else platformTrust()
        return optionsForClientTLS(name, trustRoot=cast("IOpenSSLTrustRoot", trust_root))
    return _UnauthenticatedTLS(name)
