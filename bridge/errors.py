"""The one exception root of hl7bridge, and how each error answers the outside.

Every error the bridge raises on purpose derives from :class:`BridgeError`. Each
class says, as data, how it is answered:

* ``ack_code`` / ``err_code``: the HL7 v2 acknowledgement (MSA-1) and the HL7
  table 0357 error code put in ERR-3 (v2.5+) or ERR-1 (older versions);
* ``http_status``: the HTTP status for the FHIR REST edge;
* ``retriable``: whether the sender may succeed by sending the same thing again
  later (AR in HL7 original mode means exactly that).

Library exceptions (aiokafka, kazoo, pydantic, hl7apy) are mapped to these at
the boundary with ``raise ... from exc`` so the cause is kept.

Messages (``str(error)``) never contain patient data: they name fields
(``MSH-10``), settings and limits, never values taken from a message.

::

    BridgeError
    ├── MessageError                  content of one message (AE unless noted)
    │   ├── NotHl7Error               frame is not an HL7 v2 message (AE, 100)
    │   ├── SegmentSequenceError      (AE, 100)
    │   ├── RequiredFieldMissing      (AE, 101)
    │   ├── DataTypeError             (AE, 102)
    │   ├── TableValueNotFound        (AE, 103)
    │   ├── MessageTooLarge           frame over max_frame_bytes (AE, 207)
    │   ├── UnmappedContent           strict_mapping and something not mapped (AE, 207)
    │   ├── UnsupportedMessageType    (AR, 200)
    │   ├── UnsupportedEventCode      (AR, 201)
    │   ├── UnsupportedProcessingId   (AR, 202)
    │   └── UnsupportedVersion        (AR, 203)
    ├── UnavailableError              the bridge cannot take it now (AR, 207, 503, retriable)
    │   ├── PublishError              Kafka did not acknowledge
    │   ├── CoordinationError         ZooKeeper unavailable
    │   └── OverloadedError           a bound (connections, in-flight) is reached
    ├── ConfigError                   a setting is unknown or has a bad value
    └── LifecycleError                start() twice, use before start()
"""

from __future__ import annotations

import traceback
from typing import ClassVar


class BridgeError(Exception):
    """Root of every hl7bridge error. ``str()`` carries no PHI."""

    ack_code: ClassVar[str] = "AE"
    err_code: ClassVar[str] = "207"
    http_status: ClassVar[int] = 500
    retriable: ClassVar[bool] = False

    def __init__(self, message: str, *, location: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: Where in the message the problem is, HL7 style: ``MSH-10`` or ``PID-3.1``.
        self.location = location

    @property
    def reason(self) -> str:
        """A short machine-friendly reason, used in DLQ headers and metric labels."""
        name = type(self).__name__
        return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


class MessageError(BridgeError):
    """Something is wrong with the content of one message; the sender must fix it."""

    http_status = 422


class NotHl7Error(MessageError):
    """A complete frame that is not an HL7 v2 message at all (no MSH segment first)."""

    err_code = "100"
    http_status = 400


class SegmentSequenceError(MessageError):
    err_code = "100"


class RequiredFieldMissing(MessageError):
    err_code = "101"


class DataTypeError(MessageError):
    err_code = "102"


class TableValueNotFound(MessageError):
    err_code = "103"


class MessageTooLarge(MessageError):
    """A frame exceeded ``max_frame_bytes``; sending it again unchanged cannot help."""

    err_code = "207"
    http_status = 413


class UnmappedContent(MessageError):
    """With ``strict_mapping``: the message has content the FHIR mapping does not carry.

    The text lists segment and field names (``ZPI``, ``PID-30``), never values.
    """

    err_code = "207"


class UnsupportedMessageType(MessageError):
    ack_code = "AR"
    err_code = "200"


class UnsupportedEventCode(MessageError):
    ack_code = "AR"
    err_code = "201"


class UnsupportedProcessingId(MessageError):
    ack_code = "AR"
    err_code = "202"


class UnsupportedVersion(MessageError):
    ack_code = "AR"
    err_code = "203"


class UnavailableError(BridgeError):
    """The bridge cannot take the message now; the sender should retry later."""

    ack_code = "AR"
    err_code = "207"
    http_status = 503
    retriable = True


class PublishError(UnavailableError):
    """Kafka did not acknowledge a record (broker down, timeout, not enough replicas)."""


class CoordinationError(UnavailableError):
    """ZooKeeper is not reachable or the session is gone."""


class OverloadedError(UnavailableError):
    """A configured bound (connections, in-flight messages) is reached."""


class ConfigError(BridgeError):
    """A setting is unknown or has a bad value. ``key`` names it."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class LifecycleError(BridgeError):
    """A component was used out of order: started twice, or used before start()."""


def describe_failure(exc: BaseException) -> str:
    """Name an exception without its message, which may quote patient data.

    BridgeError messages are PHI-free by contract, so they are kept; for anything
    else the type and the place it was raised are enough to find the bug.
    """
    if isinstance(exc, BridgeError):
        where = f" at {exc.location}" if exc.location else ""
        return f"{type(exc).__name__}: {exc.message}{where}"
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        return f"{type(exc).__name__} raised in {last.name} ({last.filename}:{last.lineno})"
    return type(exc).__name__
