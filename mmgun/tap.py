"""``twistd mmgun``: options and the service tree. The only place that touches the global reactor."""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.python import usage

from . import config as _config
from .clients import ClientsFileError, load_clients


class Options(_config.Options):
    """twistd's options for mmgun; a bad value ends the process with one clear line, not a usage dump."""

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"mmgun: {e}") from None

    def postOptions(self) -> None:
        super().postOptions()
        if self.config.log_format == "json" and self.parent is not None and not self.parent.get("logger"):
            # twistd resolves this name after we return (ServerOptions.postOptions).
            self.parent["logger"] = "mmgun.logs.json_observer"
        if "frontend" in self.config.roles:
            try:
                self.clients = load_clients(self.config.clients)
            except ClientsFileError as e:
                raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from .service import make_service
    from .store import StorageError

    try:
        return make_service(options.config, reactor, clients=getattr(options, "clients", None))
    except StorageError as e:
        sys.stderr.write(f"mmgun: {e}\n")
        raise SystemExit(1) from None
