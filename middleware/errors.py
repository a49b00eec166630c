"""Every exception the middleware raises on purpose.

Hierarchy::

    MiddlewareError
     +-- ProtocolError        untrusted bytes or fields failed validation (the only
     |                        error decoding ever raises)
     +-- TopicError           a topic string is not part of the topic tree
     +-- BusError             a transport failed (wraps paho/zmq errors)
     |    +-- BusClosedError  the bus was used after close()
     +-- ConfigError          configuration is invalid (file, env or flags)
     +-- ModelError           a model or tokenizer could not be loaded or used
     +-- SessionError         a session-level failure, carries the ids to diagnose
          +-- VerifierTimeout no verdict arrived in time
          +-- SessionRefused  the verifier answered ``refused`` (limit, tokenizer, ...)

Library errors are converted where they enter: ``raise BusError(...) from exc``.
"""

from __future__ import annotations


class MiddlewareError(Exception):
    """Base of all middleware errors."""


class ProtocolError(MiddlewareError):
    """Bytes from the bus are not a valid message (bad encoding, bounds, fields)."""


class TopicError(MiddlewareError):
    """A topic is malformed or outside the middleware's topic tree."""


class BusError(MiddlewareError):
    """A transport operation failed."""


class BusClosedError(BusError):
    """The bus has been closed and cannot be used again."""


class PublishUnconfirmed(BusError):
    """A QoS >= 1 publish the transport has taken but the broker has not acknowledged in
    time: the transport still holds it and sends it again after a reconnect (at least
    once).  Publishing it again would send a second copy."""


class ConfigError(MiddlewareError):
    """Invalid configuration."""


class ModelError(MiddlewareError):
    """A model or tokenizer could not be loaded or used."""


class SessionError(MiddlewareError):
    """A failure tied to one session."""

    def __init__(
        self, message: str, *, session_id: str | None = None, device_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.session_id = session_id
        self.device_id = device_id


class VerifierTimeout(SessionError):
    """No verdict arrived within the request's deadline."""


class SessionRefused(SessionError):
    """The verifier refused to open or continue the session; ``reason`` is its answer."""

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        session_id: str | None = None,
        device_id: str | None = None,
    ) -> None:
        super().__init__(message, session_id=session_id, device_id=device_id)
        self.reason = reason
