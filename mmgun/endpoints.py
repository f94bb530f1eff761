"""
``reuseport:PORT[:interface=ADDRESS][:backlog=N]``: a TCP listening endpoint with
SO_REUSEPORT. One Python process serves HTTP on one core (the GIL); frontends
started with the same ``reuseport:`` description share the port, and Linux
balances new connections across them.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import abstract
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint, IStreamServerEndpointStringParser
from twisted.internet.tcp import makeBinding
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class ReusePortParser:
    prefix = "reuseport"

    def parseStreamServer(self, reactor: Any, *args: Any, **kwargs: Any) -> IStreamServerEndpoint:
        # The interface declares (reactor, *args, **kwargs); the strports arguments are
        # those of _parse_server (as Twisted's own parsers do it).
        return self._parse_server(reactor, *args, **kwargs)

    def _parse_server(self, reactor: Any, port: str, interface: str = "", backlog: str = "50") -> IStreamServerEndpoint:
        # Same arguments as "tcp:"; the Binding carries SO_REUSEADDR (as listenTCP's
        # default) and SO_REUSEPORT.
        binding = makeBinding(interface, int(port), reuseAddress=True, reusePort=True)
        if abstract.isIPv6Address(interface):
            return TCP6ServerEndpoint(reactor, binding, int(backlog), interface)
        return TCP4ServerEndpoint(reactor, binding, int(backlog), interface)
