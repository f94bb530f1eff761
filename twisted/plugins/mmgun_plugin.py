"""twistd plugin: ``twistd mmgun``. Kept import-free so that twistd stays fast."""

from twisted.application.service import ServiceMaker

mmgun = ServiceMaker(
    "mmgun",
    "mmgun.tap",
    "mmgun mail relay: JSON over HTTP in, SMTP out",
    "mmgun",
)
