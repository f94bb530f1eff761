"""Options: flags, MMGUN_* environment variables, defaults, and clear errors."""

from __future__ import annotations

from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from mmgun.config import Options, parse_duration, parse_size


def parse(args: list[str], env: dict[str, str] | None = None):
    options = Options(env or {})
    options.parseOptions(args)
    return options.config


class OptionTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        config = parse([])
        self.assertEqual(config.listen, "tcp:8080:interface=127.0.0.1")
        self.assertEqual(config.database, "var/mmgun.sqlite3")
        self.assertEqual(config.clients, "conf/clients")
        self.assertEqual(config.roles, ("frontend", "sender", "cleaner", "webhooks"))
        self.assertEqual(config.max_message_size, 10 * 1024 * 1024)
        self.assertEqual(config.max_recipients, 1000)
        self.assertEqual((config.retry_min, config.retry_max, config.queue_lifetime), (300.0, 3600.0, 5 * 86400.0))
        self.assertEqual(config.tls, "opportunistic")

    def test_environment_used_when_no_flag(self) -> None:
        config = parse([], {"MMGUN_LISTEN": "tcp:9000", "MMGUN_SMTP_PORT": "2525", "MMGUN_ROLE": "sender, cleaner"})
        self.assertEqual((config.listen, config.smtp_port, config.roles), ("tcp:9000", 2525, ("sender", "cleaner")))

    def test_flag_wins_over_environment(self) -> None:
        config = parse(["--listen", "tcp:9001", "--role", "frontend"], {"MMGUN_LISTEN": "tcp:9000", "MMGUN_ROLE": "sender"})
        self.assertEqual((config.listen, config.roles), ("tcp:9001", ("frontend",)))

    def test_repeatable(self) -> None:
        config = parse(["--role", "sender", "--role", "frontend", "--nameserver", "127.0.0.1:5353", "--nameserver", "10.0.0.1"])
        self.assertEqual(config.roles, ("frontend", "sender"))
        self.assertEqual(config.nameservers, ("127.0.0.1:5353", "10.0.0.1"))

    def test_bad_values_name_the_option(self) -> None:
        for args, env, word in [
            (["--role", "mailer"], {}, "--role"),
            (["--smtp-port", "http"], {}, "--smtp-port"),
            (["--smtp-port", "70000"], {}, "--smtp-port"),
            ([], {"MMGUN_RETRY_MIN": "soon"}, "MMGUN_RETRY_MIN"),
            (["--tls", "maybe"], {}, "--tls"),
            (["--max-recipients", "0"], {}, "--max-recipients"),
            (["--retry-min", "2h", "--retry-max", "1h"], {}, "--retry-min"),
        ]:
            with self.assertRaises(UsageError) as caught:
                parse(args, env)
            self.assertIn(word, str(caught.exception))

    def test_durations_and_sizes(self) -> None:
        self.assertEqual([parse_duration(v) for v in ("90", "90s", "5m", "1h", "5d", "0.5s")], [90, 90, 300, 3600, 432000, 0.5])
        self.assertEqual([parse_size(v) for v in ("100", "512K", "10M", "1G")], [100, 524288, 10485760, 1073741824])
        self.assertRaises(ValueError, parse_duration, "-5s")
        self.assertRaises(ValueError, parse_size, "ten")
