# mini-mailgun/bundle: every mmgun role, the e2e stubs, and the unit tests in one image.
#
#   docker run --rm mini-mailgun/bundle                      # runs the unit tests (the default CMD)
#   docker run mini-mailgun/bundle twistd -n --pidfile= mmgun --role frontend
#
# There is no ENTRYPOINT: compose services replace the whole CMD with their twistd (or stub) command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Pinned dependencies first, in their own layer: they change far less often than the code.
COPY requirements.txt ./
RUN pip install -r requirements.txt

# A regular, non-editable install (as the Makefile does): twistd only finds twisted/plugins/mmgun_plugin.py
# in an installed distribution. The plugin cache is written now, as root, because the service user
# cannot write to site-packages (or /app) later.
COPY setup.cfg pyproject.toml README.md ./
COPY mmgun/ mmgun/
COPY twisted/ twisted/
RUN pip install --no-deps --no-build-isolation . \
    && rm -rf build mmgun.egg-info \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && twistd --help | grep -q mmgun

COPY conf/ conf/
COPY e2e-tests/ e2e-tests/
COPY tests/ tests/

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/mmgun --no-create-home --shell /usr/sbin/nologin mmgun \
    && mkdir -p /var/lib/mmgun \
    && chown mmgun:mmgun /var/lib/mmgun

# Defaults for running inside a container; a flag on the command line still wins over these.
# The clients file is empty: a frontend listening on 0.0.0.0 refuses to start while it accepts
# the demo id of conf/clients. Create API keys with `mmgun clients add` and `mmgun keys create`.
ENV MMGUN_DATABASE=/var/lib/mmgun/mmgun.sqlite3 \
    MMGUN_LISTEN=tcp:8080:interface=0.0.0.0 \
    MMGUN_CLIENTS=/app/conf/clients.container

# Declared after the chown so that a new named volume starts out owned by the service user.
VOLUME ["/var/lib/mmgun"]
EXPOSE 8080
USER mmgun

# /app is read-only for the service user, so trial keeps its scratch directory in /tmp.
CMD ["python", "-m", "twisted.trial", "--temp-directory=/tmp/_trial_temp", "tests"]
