"""The device's Prometheus metrics, fed from the session stats the node already keeps.

Served on ``[node] metrics_port`` (0, the default, serves nothing: a Pi on battery scraped by
nobody should not run an HTTP server).  Drafting time, round trip and time offline arrive
through :attr:`SessionStats.observe`; counters are added from each finished session's stats.
"""

from __future__ import annotations

from middleware.metrics import LATENCY_BUCKETS, SECONDS_BUCKETS, Registry

# Seconds offline: a blip of a few seconds up to a broker down for an hour.
OFFLINE_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)


class DeviceMetrics:
    """Named in one place, like the verifier's."""

    def __init__(self, registry: Registry | None = None) -> None:
        r = self.registry = registry or Registry()
        self.draft_s = r.histogram(
            "mw_device_draft_seconds", "Drafter call duration (one proposal)", SECONDS_BUCKETS
        )
        self.round_trip_s = r.histogram(
            "mw_device_round_trip_seconds", "Draft sent to verdict received", LATENCY_BUCKETS
        )
        self.offline_s = r.histogram(
            "mw_device_offline_seconds", "Length of each offline period", OFFLINE_BUCKETS
        )
        self.sessions = r.counter("mw_device_sessions_total", "Sessions finished")
        self.active = r.gauge("mw_device_active_sessions", "Sessions running now")
        self.rounds = r.counter("mw_device_rounds_total", "Verified rounds")
        self.proposed = r.counter("mw_device_draft_tokens_total", "Draft tokens verified")
        self.accepted = r.counter("mw_device_accepted_tokens_total", "Draft tokens accepted")
        self.tokens = r.counter("mw_device_committed_tokens_total", "Tokens committed")
        self.timeouts = r.counter("mw_device_timeouts_total", "Verdicts not received in time")
        self.offline_periods = r.counter("mw_device_offline_periods_total", "Offline periods")
        self.provisional = r.counter(
            "mw_device_provisional_tokens_total", "Tokens shown unverified while offline"
        )

    def observe(self, what: str, seconds: float) -> None:
        """The :attr:`SessionStats.observe` hook."""
        {"draft_s": self.draft_s, "round_trip_s": self.round_trip_s, "offline_s": self.offline_s}[
            what
        ].observe(seconds)

    def session_done(self, stats: dict[str, float]) -> None:
        self.sessions.inc()
        self.rounds.inc(stats["rounds"])
        self.proposed.inc(stats["proposed"])
        self.accepted.inc(stats["accepted"])
        self.tokens.inc(stats["tokens"])
        self.timeouts.inc(stats["timeouts"])
        self.offline_periods.inc(stats["offline_periods"])
        self.provisional.inc(stats["provisional"])
