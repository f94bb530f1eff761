"""Every SQL statement of the SQLite store, named. Nothing outside mmgun.store.sqlite uses these."""

from __future__ import annotations

#: Forward migrations; index i upgrades a database at user_version i to i + 1.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE submissions (
            id TEXT PRIMARY KEY,
            client TEXT NOT NULL,
            sender TEXT NOT NULL,
            created_at REAL NOT NULL,
            idempotency_key TEXT,
            request_hash TEXT,
            finished_at REAL,
            message BLOB
        )
        """,
        """
        CREATE UNIQUE INDEX submissions_idempotency
            ON submissions (client, idempotency_key) WHERE idempotency_key IS NOT NULL
        """,
        "CREATE INDEX submissions_finished ON submissions (finished_at) WHERE finished_at IS NOT NULL",
        """
        CREATE TABLE envelopes (
            id INTEGER PRIMARY KEY,
            submission_id TEXT NOT NULL REFERENCES submissions (id) ON DELETE CASCADE,
            domain TEXT NOT NULL,
            done INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            -- A lease moves next_attempt to the lease's expiry: an envelope whose
            -- sender died simply becomes due again.
            next_attempt REAL NOT NULL,
            lease TEXT,
            created_at REAL NOT NULL
        )
        """,
        "CREATE INDEX envelopes_due ON envelopes (next_attempt) WHERE done = 0",
        "CREATE INDEX envelopes_submission ON envelopes (submission_id)",
        """
        CREATE TABLE recipients (
            envelope_id INTEGER NOT NULL REFERENCES envelopes (id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            submission_id TEXT NOT NULL,
            address TEXT NOT NULL,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_reply TEXT,
            updated_at REAL NOT NULL,
            PRIMARY KEY (envelope_id, position)
        ) WITHOUT ROWID
        """,
        "CREATE INDEX recipients_submission ON recipients (submission_id)",
    ),
    (
        # Clients with stable ids and revocable API keys (only a hash of each key is kept).
        "CREATE TABLE clients (id TEXT PRIMARY KEY, created_at REAL NOT NULL) WITHOUT ROWID",
        """
        CREATE TABLE api_keys (
            key_id TEXT PRIMARY KEY,
            client_id TEXT NOT NULL REFERENCES clients (id),
            key_hash BLOB NOT NULL,
            created_at REAL NOT NULL,
            last_used_at REAL,
            revoked_at REAL
        ) WITHOUT ROWID
        """,
        "CREATE INDEX api_keys_client ON api_keys (client_id)",
    ),
    (
        # The cleaner keeps submissions with an Idempotency-Key for the key's whole window,
        # whatever the retention; this finds the others without walking past those.
        """
        CREATE INDEX submissions_finished_without_key ON submissions (finished_at)
            WHERE finished_at IS NOT NULL AND idempotency_key IS NULL
        """,
    ),
    (
        # Issue 12: scheduled sending, tags and metadata. send_at is NULL unless later than
        # created_at; the envelopes' first next_attempt (and created_at) is send_at then.
        "ALTER TABLE submissions ADD COLUMN send_at REAL",
        # A JSON array of strings; NULL when there are none.
        "ALTER TABLE submissions ADD COLUMN tags TEXT",
        # A JSON object, as the client gave it; NULL when there is none.
        "ALTER TABLE submissions ADD COLUMN metadata TEXT",
    ),
    (
        # Issue 12: the Message-ID header of the submission's message ("<...@host>"), so that
        # the id Mailgun's v3 API answers finds the submission in /status. A batch send
        # (recipient-variables) is several submissions sharing one Message-ID.
        "ALTER TABLE submissions ADD COLUMN message_id TEXT",
        "CREATE INDEX submissions_message_id ON submissions (client, message_id) WHERE message_id IS NOT NULL",
    ),
    (
        # Issue 13: sending domains (IDNA, lower case), each of one client, and their DKIM keys.
        # A private key is a PKCS#8 PEM: the database file is made readable by its owner only.
        """
        CREATE TABLE domains (
            name TEXT PRIMARY KEY,
            client_id TEXT NOT NULL REFERENCES clients (id),
            created_at REAL NOT NULL
        ) WITHOUT ROWID
        """,
        "CREATE INDEX domains_client ON domains (client_id)",
        """
        CREATE TABLE domain_keys (
            domain TEXT NOT NULL REFERENCES domains (name) ON DELETE CASCADE,
            selector TEXT NOT NULL,
            algorithm TEXT NOT NULL,
            private_key BLOB NOT NULL,
            public_key TEXT NOT NULL,
            created_at REAL NOT NULL,
            retired_at REAL,
            PRIMARY KEY (domain, selector)
        ) WITHOUT ROWID
        """,
    ),
    (
        # Issue 14: the event log. Every transaction that writes events takes, last, the next
        # number of feed_clock's one row and gives it to all of them (seq): the row is locked
        # until that transaction commits, so seq order is commit order even where several
        # writers commit at once (PostgreSQL), and a reader that follows (seq, id) never sees a
        # later commit before an earlier one. Events are kept --retention after they happen
        # (their submission, finished after its last event, is kept at least as long): no
        # foreign key and no index on submission_id, which every event would pay for.
        "CREATE TABLE feed_clock (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL)",
        "INSERT INTO feed_clock (id, seq) VALUES (1, 0)",
        """
        CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            seq INTEGER NOT NULL,
            client TEXT NOT NULL,
            domain TEXT NOT NULL,
            submission_id TEXT NOT NULL,
            recipient TEXT NOT NULL,
            event TEXT NOT NULL,
            severity TEXT,
            reason TEXT,
            attempt INTEGER,
            reply TEXT,
            mx_host TEXT,
            created_at REAL NOT NULL
        )
        """,
        "CREATE INDEX events_feed ON events (client, seq, id)",
        # Suppression lists, per client: kind is bounce, unsubscribe or complaint; address is
        # lower case. An unsubscribe's tags (a JSON array) limit it to mail with one of them.
        """
        CREATE TABLE suppressions (
            client TEXT NOT NULL,
            kind TEXT NOT NULL,
            address TEXT NOT NULL,
            code TEXT,
            error TEXT,
            tags TEXT,
            created_at REAL NOT NULL,
            PRIMARY KEY (client, kind, address)
        ) WITHOUT ROWID
        """,
        "CREATE INDEX suppressions_address ON suppressions (client, address)",
        # Webhooks: each follows the event feed from its own cursor (cursor_seq, cursor_id: the
        # last event handled); an event its receiver failed waits in webhook_retries.
        """
        CREATE TABLE webhooks (
            id TEXT PRIMARY KEY,
            client TEXT NOT NULL,
            domain TEXT,
            url TEXT NOT NULL,
            events TEXT NOT NULL,
            created_at REAL NOT NULL,
            cursor_seq INTEGER NOT NULL,
            cursor_id INTEGER NOT NULL,
            lease TEXT,
            lease_until REAL
        ) WITHOUT ROWID
        """,
        "CREATE INDEX webhooks_client ON webhooks (client)",
        """
        CREATE TABLE webhook_retries (
            webhook_id TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
            event_id INTEGER NOT NULL REFERENCES events (id) ON DELETE CASCADE,
            attempts INTEGER NOT NULL,
            first_attempt REAL NOT NULL,
            next_attempt REAL NOT NULL,
            last_error TEXT,
            lease TEXT,
            PRIMARY KEY (webhook_id, event_id)
        ) WITHOUT ROWID
        """,
        "CREATE INDEX webhook_retries_due ON webhook_retries (next_attempt)",
        "CREATE INDEX webhook_retries_event ON webhook_retries (event_id)",
        # One webhook signing key per client (Mailgun's "HTTP webhook signing key").
        "CREATE TABLE webhook_keys (client TEXT PRIMARY KEY, key TEXT NOT NULL, created_at REAL NOT NULL) WITHOUT ROWID",
    ),
    # Issue 18: each recipient domain's MTA-STS policy (RFC 8461), cached for its max_age
    # (mx: the patterns, one per line), shared by restarts and every sender.
    (
        """
        CREATE TABLE mta_sts_policies (
            domain TEXT PRIMARY KEY,
            policy_id TEXT NOT NULL,
            mode TEXT NOT NULL,
            mx TEXT NOT NULL,
            max_age INTEGER NOT NULL,
            fetched_at REAL NOT NULL,
            expires_at REAL NOT NULL
        ) WITHOUT ROWID
        """,
    ),
    # Issue 18: destination back-off (mmgun.backoff): recipient domains paused (kind 'domain'),
    # honoured by every sender, and MX hosts whose concurrency a sender lowered (kind 'mx'),
    # for mmgun stats. Written on change; rows ended (until passed) are deleted at each write.
    (
        """
        CREATE TABLE destination_backoff (
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            sender TEXT NOT NULL,
            until REAL NOT NULL,
            reply TEXT NOT NULL,
            concurrency INTEGER,
            updated_at REAL NOT NULL,
            PRIMARY KEY (kind, name, sender)
        ) WITHOUT ROWID
        """,
    ),
)

CONNECTION_PRAGMAS = (
    "PRAGMA journal_mode = WAL",
    # FULL: a commit is on disk (WAL fsync'd) before we acknowledge a submission.
    "PRAGMA synchronous = FULL",
    "PRAGMA foreign_keys = ON",
    # Truncate the WAL after a checkpoint once it passes 64 MiB, so a burst does not leave a huge file.
    "PRAGMA journal_size_limit = 67108864",
    # 16 MiB of page cache per connection (SQLite's default is 2 MiB): a deep queue's
    # indexes stay in memory without taking a sender past its memory budget.
    "PRAGMA cache_size = -16384",
)

USER_VERSION = "PRAGMA user_version"
JOURNAL_MODE = "PRAGMA journal_mode"
SET_USER_VERSION = "PRAGMA user_version = {version:d}"  # an int, formatted: PRAGMA takes no parameters

BEGIN_WRITE = "BEGIN IMMEDIATE"
BEGIN_READ = "BEGIN"
COMMIT = "COMMIT"
SAVEPOINT = "SAVEPOINT submission"
RELEASE = "RELEASE submission"
ROLLBACK_TO = "ROLLBACK TO submission"
PING = "SELECT 1"
#: PostgreSQL's NOTIFY to its listening senders (issue 17): none here, skipped. SQLite's senders
#: in other processes are woken by a datagram in the wake directory (mmgun.wakeup).
WAKE_SENDERS: str | None = None

FIND_IDEMPOTENT = """
    SELECT id, request_hash, created_at FROM submissions
    WHERE client = ? AND idempotency_key = ?
"""
FORGET_IDEMPOTENCY_KEY = "UPDATE submissions SET idempotency_key = NULL WHERE id = ?"
INSERT_SUBMISSION = """
    INSERT INTO submissions (
        id, client, sender, created_at, idempotency_key, request_hash, message, send_at, tags, metadata, message_id, finished_at
    )
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
# A JSON array of [submission id, domain, done (0 or 1), next attempt, created at]: a
# submission's envelopes are one per domain, so (submission id, domain) names each id returned.
INSERT_ENVELOPES = """
    INSERT INTO envelopes (submission_id, domain, done, next_attempt, created_at)
    SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), json_extract(value, '$[3]'), json_extract(value, '$[4]') FROM json_each(?)
    RETURNING id, submission_id, domain
"""
INSERT_RECIPIENT = """
    INSERT INTO recipients (envelope_id, position, submission_id, address, status, updated_at)
    VALUES (?, ?, ?, ?, 'queued', ?)
"""
# A test-mode submission (Mailgun's o:testmode) is finished when it is queued: its
# envelopes done, its recipients "sent" with a reply saying that nothing was delivered.
INSERT_RECIPIENT_TEST_MODE = """
    INSERT INTO recipients (envelope_id, position, submission_id, address, status, last_reply, updated_at)
    VALUES (?, ?, ?, ?, 'sent', ?, ?)
"""

SUBMISSION_SENDER = "SELECT client, sender FROM submissions WHERE id = ?"
SUBMISSION_OWNER = "SELECT send_at, tags, metadata FROM submissions WHERE id = ? AND client = ?"
# The newest submission with that Message-ID, or the newest batch (a batch's submissions are
# stored in one transaction, with one created_at): a client that posts the same message twice
# (messages.mime keeps the message's own Message-ID) sees the later post, not a merge of both.
SUBMISSIONS_BY_MESSAGE_ID = """
    SELECT id FROM submissions
    WHERE client = :client AND message_id = :message_id
      AND created_at = (
          SELECT max(created_at) FROM submissions WHERE client = :client AND message_id = :message_id
      )
    ORDER BY rowid LIMIT :limit
"""
SUBMISSION_RECIPIENTS = """
    SELECT address, status, attempts, last_reply, updated_at FROM recipients
    WHERE submission_id = ? ORDER BY envelope_id, position
"""

# A claim reads the due envelopes with the size of their message (length() of a BLOB
# comes from the record header: the message itself is not read), keeps those that fit
# the sender's byte budget, leases them, then reads each distinct submission's message
# once (and none the sender already holds).
CLAIM_CANDIDATES = """
    SELECT e.id, e.submission_id, coalesce(length(s.message), 0)
    FROM envelopes e JOIN submissions s ON s.id = e.submission_id
    WHERE e.done = 0 AND e.next_attempt <= ?
    ORDER BY e.next_attempt LIMIT ?
"""
# Envelope ids travel as one JSON array parameter: no SQL text is built at run time.
CLAIM = """
    UPDATE envelopes SET lease = ?, next_attempt = ?
    WHERE id IN (SELECT value FROM json_each(?))
    RETURNING id, submission_id, domain, attempts, created_at
"""
# :held is a JSON array of submission ids whose message the sender already holds (NULL for those).
CLAIMED_SUBMISSIONS = """
    SELECT id, sender, client, CASE WHEN id IN (SELECT value FROM json_each(:held)) THEN NULL ELSE message END
    FROM submissions WHERE id IN (SELECT value FROM json_each(:ids))
"""
PENDING_RECIPIENTS = """
    SELECT envelope_id, address FROM recipients
    WHERE envelope_id IN (SELECT value FROM json_each(?)) AND status IN ('queued', 'deferred')
    ORDER BY envelope_id, position
"""
RENEW = "UPDATE envelopes SET next_attempt = ? WHERE id = ? AND lease = ?"
UPDATE_RECIPIENT = """
    UPDATE recipients SET status = ?, attempts = attempts + ?, last_reply = ?, updated_at = ?
    WHERE envelope_id = ? AND address = ? AND status IN ('queued', 'deferred')
"""
# :finishes is a JSON array of [envelope id, attempted (0 or 1), next attempt, lease]: each
# envelope whose lease is still that one is released, its attempts counted, and done once no
# recipient of it is pending.
FINISH_ENVELOPES = """
    UPDATE envelopes SET lease = NULL, attempts = attempts + (json_extract(j.value, '$[1]')), next_attempt = json_extract(j.value, '$[2]'),
        done = NOT EXISTS (
            SELECT 1 FROM recipients WHERE envelope_id = envelopes.id AND status IN ('queued', 'deferred')
        )
    FROM json_each(?) AS j
    WHERE envelopes.id = json_extract(j.value, '$[0]') AND envelopes.lease = json_extract(j.value, '$[3]')
    RETURNING envelopes.id, envelopes.submission_id, envelopes.done
"""
# A submission is finished when its last envelope is; its message text is erased
# then (bodies are sensitive), the status rows stay until retention.
# A JSON array of [submission id, finished at].
FINISH_SUBMISSIONS = """
    UPDATE submissions SET finished_at = json_extract(j.value, '$[1]'), message = NULL
    FROM json_each(?) AS j
    WHERE submissions.id = json_extract(j.value, '$[0]') AND submissions.finished_at IS NULL
      AND NOT EXISTS (SELECT 1 FROM envelopes WHERE submission_id = submissions.id AND done = 0)
"""
# The submissions (a JSON array of ids) whose envelopes a transaction is about to finish. SQLite
# has one writer at a time, so this only reads; PostgreSQL's locks them (see its queries).
LOCK_SUBMISSIONS = "SELECT id FROM submissions WHERE id IN (SELECT value FROM json_each(?))"
# The envelopes of a JSON array of [envelope id, lease] whose lease is still that one.
LEASES_HELD = """
    SELECT e.id, e.lease FROM envelopes e JOIN json_each(?) AS j ON e.id = json_extract(j.value, '$[0]') AND e.lease = json_extract(j.value, '$[1]')
"""
# A sender restarted under its identity takes back the envelopes its previous run had
# leased ("<identity>/<random>"): ? = now, length of "<identity>/", "<identity>/".
# substr, not LIKE: an identity may contain "_", which LIKE reads as a wildcard.
RECLAIM_IDENTITY = """
    UPDATE envelopes SET lease = NULL, next_attempt = ?
    WHERE done = 0 AND lease IS NOT NULL AND substr(lease, 1, ?) = ?
"""
# After the wall clock stepped back: envelopes never attempted and not leased are due
# now, not when the clock has caught up with the time they were queued at — but never
# before their submission's send_at.
DUE_UNATTEMPTED = """
    UPDATE envelopes SET next_attempt = :now
    WHERE done = 0 AND attempts = 0 AND lease IS NULL AND next_attempt > :now
      AND NOT EXISTS (SELECT 1 FROM submissions s WHERE s.id = envelopes.submission_id AND s.send_at > :now)
"""

# Lets the cleaner hand free pages back to the file system. Takes effect only on a new file
# before journal_mode = WAL writes its header, or with a VACUUM after it (a one-time conversion).
AUTO_VACUUM = "PRAGMA auto_vacuum = INCREMENTAL"
AUTO_VACUUM_MODE = "PRAGMA auto_vacuum"  # 0 none, 1 full, 2 incremental
PAGE_COUNT = "PRAGMA page_count"
VACUUM = "VACUUM"
# Every submission finished before :before (the caller makes it no later than the start of
# the idempotency window): the index submissions_finished, every row in the range deleted.
DELETE_FINISHED = """
    DELETE FROM submissions WHERE id IN (
        SELECT id FROM submissions WHERE finished_at IS NOT NULL AND finished_at < :before LIMIT :limit
    )
"""
# Those without an Idempotency-Key finished before :before: the partial index
# submissions_finished_without_key, so a day of keyed submissions is never walked to skip them.
DELETE_FINISHED_WITHOUT_KEY = """
    DELETE FROM submissions WHERE id IN (
        SELECT id FROM submissions
        WHERE finished_at IS NOT NULL AND idempotency_key IS NULL AND finished_at < :before LIMIT :limit
    )
"""
INCREMENTAL_VACUUM = "PRAGMA incremental_vacuum({pages:d})"  # an int, formatted: PRAGMA takes no parameters
FREELIST_COUNT = "PRAGMA freelist_count"

# -- the operator's command (mmgun.admin) --------------------------------------
# "In delivery" everywhere below: a lease that has not expired (an expired one is a sender
# that died: the envelope is simply due).

# :status is NULL, 'queued' (never attempted), 'scheduled' (never attempted, send_at still
# ahead) or 'deferred' (attempted); :domain is NULL or one domain.
QUEUE_ENVELOPES = """
    SELECT e.id, e.submission_id, s.client, e.domain, e.attempts, e.next_attempt,
        e.lease IS NOT NULL AND e.next_attempt > :now, e.created_at,
        e.attempts = 0 AND coalesce(s.send_at > :now, 0)
    FROM envelopes e JOIN submissions s ON s.id = e.submission_id
    WHERE e.done = 0
      AND (:domain IS NULL OR e.domain = :domain)
      AND (:status IS NULL OR :status = CASE
          WHEN e.attempts > 0 THEN 'deferred' WHEN coalesce(s.send_at > :now, 0) THEN 'scheduled' ELSE 'queued' END)
    ORDER BY e.id
"""
QUEUE_RECIPIENTS = """
    SELECT envelope_id, address, last_reply, updated_at FROM recipients
    WHERE envelope_id IN (SELECT value FROM json_each(?)) AND status IN ('queued', 'deferred')
    ORDER BY envelope_id, position
"""
# The operator names envelopes by id (a JSON array of integers) or by submission (one of strings).
MATCH_QUEUED = """
    SELECT id, submission_id, lease IS NOT NULL AND next_attempt > ?, next_attempt FROM envelopes
    WHERE done = 0
      AND (id IN (SELECT value FROM json_each(?)) OR submission_id IN (SELECT value FROM json_each(?)))
    ORDER BY id
"""
# :ids is NULL (every envelope) or a JSON array of envelope ids.
FLUSH_DEFERRED = """
    UPDATE envelopes SET next_attempt = :now
    WHERE done = 0 AND attempts > 0 AND lease IS NULL AND next_attempt > :now
      AND (:ids IS NULL OR id IN (SELECT value FROM json_each(:ids)))
"""
COUNT_IN_DELIVERY = """
    SELECT count(*) FROM envelopes
    WHERE done = 0 AND lease IS NOT NULL AND next_attempt > :now
      AND (:ids IS NULL OR id IN (SELECT value FROM json_each(:ids)))
"""
FINISH_FAILED_ENVELOPES = """
    UPDATE envelopes SET done = 1, lease = NULL
    WHERE id IN (SELECT value FROM json_each(?)) AND done = 0
"""
RECIPIENTS_BY_STATUS = "SELECT status, count(*) FROM recipients GROUP BY status ORDER BY status"
# The oldest: among the envelopes already in the queue (a scheduled envelope's created_at is
# its send_at, still ahead), so a message scheduled for next week is no old backlog.
UNFINISHED_SUMMARY = """
    SELECT count(*), coalesce(sum(lease IS NOT NULL AND next_attempt > :now), 0),
        min(CASE WHEN created_at <= :now THEN created_at END)
    FROM envelopes WHERE done = 0
"""
# For the /metrics gauges every few seconds: walks only unfinished envelopes (the partial
# index envelopes_due, then the recipients' primary key), never the finished history that
# RECIPIENTS_BY_STATUS counts. A pending recipient is always in an unfinished envelope.
PENDING_BY_STATUS = """
    SELECT r.status, count(*) FROM envelopes e JOIN recipients r ON r.envelope_id = e.id
    WHERE e.done = 0 AND r.status IN ('queued', 'deferred')
    GROUP BY r.status ORDER BY r.status
"""
BACKLOG_BY_DOMAIN = """
    SELECT e.domain, count(*) AS pending
    FROM recipients r JOIN envelopes e ON e.id = r.envelope_id
    WHERE e.done = 0 AND r.status IN ('queued', 'deferred')
    GROUP BY e.domain ORDER BY pending DESC, e.domain LIMIT ?
"""

# -- clients and API keys --------------------------------------------------------
INSERT_CLIENT = "INSERT INTO clients (id, created_at) VALUES (?, ?)"
CLIENT_EXISTS = "SELECT 1 FROM clients WHERE id = ?"
INSERT_KEY = "INSERT INTO api_keys (key_id, client_id, key_hash, created_at) VALUES (?, ?, ?, ?)"
LIST_KEYS = """
    SELECT key_id, client_id, created_at, last_used_at, revoked_at FROM api_keys
    WHERE client_id = ? ORDER BY created_at, key_id
"""
REVOKE_KEY = "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL"
KEY_EXISTS = "SELECT 1 FROM api_keys WHERE key_id = ?"
FIND_KEY = "SELECT client_id, key_hash, revoked_at IS NOT NULL FROM api_keys WHERE key_id = ?"
ALL_KEY_IDS = "SELECT key_id FROM api_keys"
TOUCH_KEY = "UPDATE api_keys SET last_used_at = max(coalesce(last_used_at, 0), ?) WHERE key_id = ?"
# Pending recipients per client: walks only unfinished envelopes (the partial index), never the history.
QUEUED_BY_CLIENT = """
    SELECT s.client, count(*) FROM envelopes e
    JOIN submissions s ON s.id = e.submission_id
    JOIN recipients r ON r.envelope_id = e.id
    WHERE e.done = 0 AND r.status IN ('queued', 'deferred')
    GROUP BY s.client
"""
# Message bytes of the unfinished submissions per client, each submission counted once
# however many envelopes it has: found through the unfinished envelopes (the partial
# index), and length() of a BLOB reads its size from the record header, not its content.
QUEUED_BYTES_BY_CLIENT = """
    SELECT s.client, sum(length(s.message)) FROM submissions s
    WHERE s.id IN (SELECT submission_id FROM envelopes WHERE done = 0)
    GROUP BY s.client
"""

# -- sending domains and their DKIM keys (issue 13) -------------------------------
INSERT_DOMAIN = "INSERT INTO domains (name, client_id, created_at) VALUES (?, ?, ?)"
FIND_DOMAIN = "SELECT name, client_id, created_at FROM domains WHERE name = ?"
ALL_DOMAINS = "SELECT name, client_id, created_at FROM domains ORDER BY name"
CLIENT_DOMAINS = "SELECT name, client_id, created_at FROM domains WHERE client_id = ? ORDER BY name"
DELETE_DOMAIN_KEYS = "DELETE FROM domain_keys WHERE domain = ?"
DELETE_DOMAIN = "DELETE FROM domains WHERE name = ?"
INSERT_DOMAIN_KEY = """
    INSERT INTO domain_keys (domain, selector, algorithm, private_key, public_key, created_at, retired_at)
    VALUES (?, ?, ?, ?, ?, ?, ?)
"""
DOMAIN_KEY_EXISTS = "SELECT 1 FROM domain_keys WHERE domain = ? AND selector = ?"
# Newest first; a selector breaks a tie (two keys made in one second).
DOMAIN_KEYS = """
    SELECT domain, selector, algorithm, private_key, public_key, created_at, retired_at FROM domain_keys
    WHERE domain = ? ORDER BY created_at DESC, selector DESC
"""
ACTIVE_DOMAIN_KEYS = """
    SELECT domain, selector, algorithm, private_key, public_key, created_at, retired_at FROM domain_keys
    WHERE domain = ? AND retired_at IS NULL ORDER BY created_at DESC, selector DESC
"""
RETIRE_DOMAIN_KEY = "UPDATE domain_keys SET retired_at = ? WHERE domain = ? AND selector = ? AND retired_at IS NULL"

# -- events (issue 14) ---------------------------------------------------------------------------

NEXT_FEED_SEQ = "UPDATE feed_clock SET seq = seq + 1 WHERE id = 1 RETURNING seq"
INSERT_EVENT = """
    INSERT INTO events (
        seq, client, domain, submission_id, recipient, event, severity, reason, attempt, reply, mx_host, created_at
    )
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
# Up to :limit events from before :before among the oldest :window: a range of the primary key,
# never a scan of the whole log for old rows among new ones, and a few events stamped later
# than their neighbours (clocks of several hosts) cannot stop the cleaning.
DELETE_OLD_EVENTS = """
    DELETE FROM events WHERE id IN (
        SELECT id FROM (SELECT id, created_at FROM events ORDER BY id LIMIT :window)
        WHERE created_at < :before LIMIT :limit
    )
"""
# Events of one client after (ascending) or before (descending) a feed position, with the
# submission's Message-ID, sender, tags and metadata. Each filter is NULL when not used.
_EVENT_COLUMNS = """
    e.seq, e.id, e.client, e.domain, e.submission_id, e.recipient, e.event, e.severity, e.reason, e.attempt,
    e.reply, e.mx_host, e.created_at, s.message_id, coalesce(s.sender, ''), s.tags, s.metadata
"""
_EVENT_FILTERS = """
    e.client = :client
    AND (:domain IS NULL OR e.domain = :domain)
    AND (:event IS NULL OR e.event = :event)
    AND (:severity IS NULL OR e.severity = :severity)
    AND (:recipient IS NULL OR e.recipient = :recipient)
    AND (:begin IS NULL OR e.created_at >= :begin)
    AND (:end IS NULL OR e.created_at <= :end)
"""
EVENTS_AFTER = (
    "SELECT" + _EVENT_COLUMNS + "FROM events e LEFT JOIN submissions s ON s.id = e.submission_id WHERE" + _EVENT_FILTERS
    + " AND (e.seq > :seq OR (e.seq = :seq AND e.id > :id)) ORDER BY e.seq, e.id LIMIT :limit"
)
EVENTS_BEFORE = (
    "SELECT" + _EVENT_COLUMNS + "FROM events e LEFT JOIN submissions s ON s.id = e.submission_id WHERE" + _EVENT_FILTERS
    + " AND (e.seq < :seq OR (e.seq = :seq AND e.id < :id)) ORDER BY e.seq DESC, e.id DESC LIMIT :limit"
)

# A bounded page: the filters are applied to at most :scan of the client's events after (or
# before) the position — an index range — so that a filter that matches little never walks the
# whole log; EVENTS_SCANNED_* say how far that range reached.
_SCAN_AFTER = """
    SELECT * FROM events WHERE client = :client AND (seq, id) > (:seq, :id) ORDER BY seq, id LIMIT :scan
"""
_SCAN_BEFORE = """
    SELECT * FROM events WHERE client = :client AND (seq, id) < (:seq, :id) ORDER BY seq DESC, id DESC LIMIT :scan
"""
_PAGE_FILTERS = """
    (:domain IS NULL OR e.domain = :domain)
    AND (:event IS NULL OR e.event = :event)
    AND (:severity IS NULL OR e.severity = :severity)
    AND (:recipient IS NULL OR e.recipient = :recipient)
    AND (:begin IS NULL OR e.created_at >= :begin)
    AND (:end IS NULL OR e.created_at <= :end)
"""
EVENTS_PAGE_AFTER = (
    "SELECT" + _EVENT_COLUMNS + "FROM (" + _SCAN_AFTER + ") e LEFT JOIN submissions s ON s.id = e.submission_id WHERE"
    + _PAGE_FILTERS + " ORDER BY e.seq, e.id LIMIT :limit"
)
EVENTS_PAGE_BEFORE = (
    "SELECT" + _EVENT_COLUMNS + "FROM (" + _SCAN_BEFORE + ") e LEFT JOIN submissions s ON s.id = e.submission_id WHERE"
    + _PAGE_FILTERS + " ORDER BY e.seq DESC, e.id DESC LIMIT :limit"
)
EVENTS_SCANNED_LAST_AFTER = """
    SELECT seq, id FROM (
        SELECT seq, id FROM events WHERE client = :client AND (seq, id) > (:seq, :id) ORDER BY seq, id LIMIT :scan
    ) ORDER BY seq DESC, id DESC LIMIT 1
"""
EVENTS_SCANNED_LAST_BEFORE = """
    SELECT seq, id FROM (
        SELECT seq, id FROM events WHERE client = :client AND (seq, id) < (:seq, :id) ORDER BY seq DESC, id DESC LIMIT :scan
    ) ORDER BY seq, id LIMIT 1
"""
EVENTS_SCANNED_COUNT_AFTER = """
    SELECT count(*) FROM (
        SELECT 1 FROM events WHERE client = :client AND (seq, id) > (:seq, :id) ORDER BY seq, id LIMIT :scan
    )
"""
EVENTS_SCANNED_COUNT_BEFORE = """
    SELECT count(*) FROM (
        SELECT 1 FROM events WHERE client = :client AND (seq, id) < (:seq, :id) ORDER BY seq DESC, id DESC LIMIT :scan
    )
"""

# -- suppressions (issue 14) ---------------------------------------------------------------------

# The suppression entries of a JSON array of [client, address] (addresses in lower case).
SUPPRESSED_AMONG = """
    SELECT s.client, s.address, s.kind, s.error, s.tags
    FROM json_each(?) AS j JOIN suppressions s INDEXED BY suppressions_address ON s.client = json_extract(j.value, '$[0]') AND s.address = json_extract(j.value, '$[1]')
"""
# A bounce recorded by the sender: client from the submission; a newer bounce replaces an older.
ADD_BOUNCE_FROM_SUBMISSION = """
    INSERT INTO suppressions (client, kind, address, code, error, tags, created_at)
    SELECT client, 'bounce', :address, :code, :error, NULL, :at FROM submissions WHERE id = :submission_id
    ON CONFLICT (client, kind, address) DO UPDATE SET code = excluded.code, error = excluded.error,
        created_at = excluded.created_at
"""
INSERT_RECIPIENT_FAILED = """
    INSERT INTO recipients (envelope_id, position, submission_id, address, status, last_reply, updated_at)
    VALUES (?, ?, ?, ?, 'failed', ?, ?)
"""
FAIL_PENDING_RECIPIENTS_RETURNING = """
    UPDATE recipients SET status = 'failed', last_reply = :reply, updated_at = :now
    WHERE envelope_id IN (SELECT value FROM json_each(:ids)) AND status IN ('queued', 'deferred')
    RETURNING submission_id, address, attempts, envelope_id, position
"""
SUPPRESSIONS_AFTER = """
    SELECT client, kind, address, created_at, code, error, tags FROM suppressions
    WHERE client = :client AND kind = :kind AND address > :after ORDER BY address LIMIT :limit
"""
SUPPRESSIONS_BEFORE = """
    SELECT client, kind, address, created_at, code, error, tags FROM suppressions
    WHERE client = :client AND kind = :kind AND (:before IS NULL OR address < :before)
    ORDER BY address DESC LIMIT :limit
"""
SUPPRESSION = """
    SELECT client, kind, address, created_at, code, error, tags FROM suppressions
    WHERE client = ? AND kind = ? AND address = ?
"""
UPSERT_SUPPRESSION = """
    INSERT INTO suppressions (client, kind, address, code, error, tags, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (client, kind, address) DO UPDATE SET code = excluded.code, error = excluded.error,
        tags = excluded.tags, created_at = excluded.created_at
"""
DELETE_SUPPRESSION = "DELETE FROM suppressions WHERE client = ? AND kind = ? AND address = ?"
CLEAR_SUPPRESSIONS = """
    DELETE FROM suppressions WHERE (client, kind, address) IN (
        SELECT client, kind, address FROM suppressions WHERE client = ? AND kind = ? LIMIT ?
    )
"""

# -- webhooks (issue 14) -------------------------------------------------------------------------

# The feed's last commit number: a new webhook starts after every event committed so far.
FEED_END = "SELECT seq FROM feed_clock WHERE id = 1"
_WEBHOOK_COLUMNS = " id, client, domain, url, events, created_at, cursor_seq, cursor_id "
INSERT_WEBHOOK = """
    INSERT INTO webhooks (id, client, domain, url, events, created_at, cursor_seq, cursor_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
"""
ALL_WEBHOOKS = "SELECT" + _WEBHOOK_COLUMNS + "FROM webhooks ORDER BY created_at, id"
CLIENT_WEBHOOKS = "SELECT" + _WEBHOOK_COLUMNS + "FROM webhooks WHERE client = ? ORDER BY created_at, id"
FIND_WEBHOOK = "SELECT" + _WEBHOOK_COLUMNS + "FROM webhooks WHERE id = ?"
WEBHOOKS_AMONG = "SELECT" + _WEBHOOK_COLUMNS + "FROM webhooks WHERE id IN (SELECT value FROM json_each(?))"
UPDATE_WEBHOOK = "UPDATE webhooks SET url = ?, events = ? WHERE id = ?"
DELETE_WEBHOOK = "DELETE FROM webhooks WHERE id = ?"
WEBHOOK_KEY = "SELECT key FROM webhook_keys WHERE client = ?"
SET_WEBHOOK_KEY = """
    INSERT INTO webhook_keys (client, key, created_at) VALUES (?, ?, ?)
    ON CONFLICT (client) DO UPDATE SET key = excluded.key, created_at = excluded.created_at
"""
ADD_WEBHOOK_KEY = "INSERT INTO webhook_keys (client, key, created_at) VALUES (?, ?, ?) ON CONFLICT (client) DO NOTHING"
RELEASE_WEBHOOKS = "UPDATE webhooks SET lease = NULL, lease_until = NULL WHERE lease = ?"
RELEASE_WEBHOOK_RETRIES = "UPDATE webhook_retries SET lease = NULL, next_attempt = ? WHERE lease = ?"
LEASE_WEBHOOKS = (
    "UPDATE webhooks SET lease = :lease, lease_until = :until"
    " WHERE lease IS NULL OR lease = :lease OR lease_until < :now RETURNING" + _WEBHOOK_COLUMNS
)
# Only the webhooks no dispatcher holds (new, released, or a lease that ran out): a tick
# between renewals writes no row it already holds.
TAKE_WEBHOOKS = (
    "UPDATE webhooks SET lease = :lease, lease_until = :until"
    " WHERE lease IS NULL OR lease_until < :now RETURNING" + _WEBHOOK_COLUMNS
)
ADVANCE_WEBHOOK = "UPDATE webhooks SET cursor_seq = ?, cursor_id = ? WHERE id = ? AND lease = ?"
INSERT_WEBHOOK_RETRY = """
    INSERT INTO webhook_retries (webhook_id, event_id, attempts, first_attempt, next_attempt, last_error)
    VALUES (?, ?, 1, ?, ?, ?) ON CONFLICT (webhook_id, event_id) DO NOTHING
"""
# A lease moves next_attempt to the lease's end: a retry whose dispatcher died is due again then.
LEASE_WEBHOOK_RETRIES = """
    UPDATE webhook_retries SET lease = :lease, next_attempt = :until
    WHERE (webhook_id, event_id) IN (
        SELECT webhook_id, event_id FROM webhook_retries WHERE next_attempt <= :now ORDER BY next_attempt LIMIT :limit
    )
    RETURNING webhook_id, event_id, attempts, first_attempt, last_error
"""
DELETE_WEBHOOK_RETRY = "DELETE FROM webhook_retries WHERE webhook_id = ? AND event_id = ? AND lease = ?"
WEBHOOK_RETRY_AGAIN = """
    UPDATE webhook_retries SET attempts = attempts + 1, next_attempt = ?, last_error = ?, lease = NULL
    WHERE webhook_id = ? AND event_id = ? AND lease = ?
"""
# mmgun webhooks flush: waiting retries due now; those a dispatcher holds (POSTing) are left to it.
FLUSH_WEBHOOK_RETRIES = """
    UPDATE webhook_retries SET next_attempt = :now
    WHERE lease IS NULL AND next_attempt > :now
      AND (:ids IS NULL OR webhook_id IN (SELECT value FROM json_each(:ids)))
"""
COUNT_WEBHOOK_RETRIES_IN_DELIVERY = """
    SELECT count(*) FROM webhook_retries
    WHERE lease IS NOT NULL AND next_attempt > :now
      AND (:ids IS NULL OR webhook_id IN (SELECT value FROM json_each(:ids)))
"""
EVENTS_BY_ID = (
    "SELECT" + _EVENT_COLUMNS + "FROM events e LEFT JOIN submissions s ON s.id = e.submission_id"
    " WHERE e.id IN (SELECT value FROM json_each(?))"
)

# -- MTA-STS policies (issue 18) ----------------------------------------------------------------
MTA_STS_POLICY = (
    "SELECT domain, policy_id, mode, mx, max_age, fetched_at FROM mta_sts_policies WHERE domain = ? AND expires_at > ?"
)
SAVE_MTA_STS_POLICY = """
    INSERT INTO mta_sts_policies (domain, policy_id, mode, mx, max_age, fetched_at, expires_at)
    VALUES (?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (domain) DO UPDATE SET
        policy_id = excluded.policy_id, mode = excluded.mode, mx = excluded.mx, max_age = excluded.max_age,
        fetched_at = excluded.fetched_at, expires_at = excluded.expires_at
    WHERE mta_sts_policies.fetched_at <= excluded.fetched_at
"""
FORGET_EXPIRED_MTA_STS_POLICIES = "DELETE FROM mta_sts_policies WHERE expires_at <= ?"

# -- destination back-off (issue 18) ------------------------------------------------------------
SAVE_BACKOFF = """
    INSERT INTO destination_backoff (kind, name, sender, until, reply, concurrency, updated_at)
    VALUES (?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (kind, name, sender) DO UPDATE SET
        until = excluded.until, reply = excluded.reply, concurrency = excluded.concurrency,
        updated_at = excluded.updated_at
    WHERE destination_backoff.updated_at <= excluded.updated_at
"""
FORGET_ENDED_BACKOFFS = "DELETE FROM destination_backoff WHERE until <= ?"
BACKOFFS = """
    SELECT kind, name, sender, until, reply, concurrency, updated_at FROM destination_backoff
    WHERE until > ? ORDER BY kind, name, sender
"""
