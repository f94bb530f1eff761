"""
The ``reuseport:`` endpoint for ``--listen``: TCP with SO_REUSEPORT, so several
mmgun frontends can listen on one port and the kernel spreads the connections
over them. Twisted imports every plugin module to list them: this one imports only the parser.
"""

from mmgun.endpoints import ReusePortParser

reuseport = ReusePortParser()
