"""
The port number a listener got, typed: C{IListeningPort.getHost()} is declared to
return a bare L{IAddress}, which has no C{port}, although TCP and UDP listeners
return an L{IPv4Address} or L{IPv6Address}.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort

__all__ = ["port_number"]


def port_number(listening: IListeningPort) -> int:
    """
    The TCP or UDP port number that C{listening} is bound to (the one picked for
    port 0).

    @raise TypeError: C{listening} is not bound to an IP address (a UNIX socket).
    """
    address = listening.getHost()
    if not isinstance(address, (IPv4Address, IPv6Address)):
        raise TypeError(f"not an IP listener: {address!r}")
    return address.port
