"""
The HTTP frontend: the seed's JSON API and, beside it on the same port, further APIs.

- :mod:`.settings` — :class:`~.settings.WebSettings`, every frontend setting, typed.
- :mod:`.site` — the Site, the connection and the request: the request limits every API shares.
- :mod:`.errors` — a failure becomes (code, message, headers); each API gives it its own shape.
- :mod:`.submit` — authentication and the submission pipeline every API calls.
- :mod:`.json_api` — ``/``, ``/send``, ``/status``, ``/healthz``, ``/metrics``.
- :mod:`.app` — the root resource (one route per endpoint) and :class:`~.app.Frontend`.
"""
