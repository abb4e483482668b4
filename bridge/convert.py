"""``hl7bridge convert``: HL7 v2 files → the CloudEvents the bridge would publish.

Offline, no servers. Each message of each file goes through the same steps as
on the MLLP path, except the accepted-type check (convert converts what it
can) and Kafka: parse (:func:`~adapters.hl7v2.er7.parse_message`), header
validation (:func:`~adapters.hl7v2.er7.validate_header`), then
:func:`bridge.events.hl7v2_event`, the one place that decides an event's id,
type, subject and data. So what convert prints is what a consumer of
``<prefix>.events`` receives, in CloudEvents structured JSON form instead of
binary mode (only ``time`` and the Bundle's ``timestamp`` differ: they are the
time of conversion).

A message that cannot be converted is reported on stderr as
``FILE#INDEX: ErrorClass at LOCATION: reason``: names and HL7 locations,
never content from the message (it is patient data).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import orjson

from adapters.hl7v2.er7 import parse_message, validate_header
from adapters.hl7v2.files import read_files
from bridge.config import Settings
from bridge.errors import BridgeError, describe_failure
from bridge.events import Hl7v2Event, hl7v2_event
from bridge.normalize import MappingOptions

#: Exit status: every message converted / at least one did not.
EXIT_CONVERTED: Final = 0
EXIT_NOT_CONVERTED: Final = 1


@dataclass(frozen=True, slots=True)
class ConvertOptions:
    """The settings that change what a message maps to (same names as the bridge's)."""

    mapping: MappingOptions = field(default_factory=MappingOptions)
    strict_mapping: bool = False


def options_from_settings(settings: Settings) -> ConvertOptions:
    """The mapping choices of a bridge's settings (identifier_systems,
    hl7_default_timezone, strict_mapping), so convert maps as that bridge does."""
    return ConvertOptions(
        mapping=settings.mapping_options(), strict_mapping=settings.strict_mapping
    )


@dataclass(frozen=True, slots=True)
class Converted:
    """One message converted: where it came from and its event in structured form."""

    file: str
    #: 1-based position of the message in its file.
    index: int
    described: Hl7v2Event

    def structured(self) -> dict[str, Any]:
        """The CloudEvent in structured JSON form, the FHIR Bundle as ``data``."""
        return self.described.event.structured(self.described.data)


@dataclass(frozen=True, slots=True)
class NotConverted:
    """One message that could not be converted, and why (no message content)."""

    file: str
    index: int
    error: str

    def line(self) -> str:
        return f"{self.file}#{self.index}: {self.error}"


def describe_error(exc: BaseException) -> str:
    """``DataTypeError at PID-7: not a valid calendar date``; for a defect in the
    bridge itself, the exception class and where it was raised (never its text)."""
    if isinstance(exc, BridgeError):
        where = f" at {exc.location}" if exc.location else ""
        return f"{type(exc).__name__}{where}: {exc.message}"
    return f"internal error (a bridge defect): {describe_failure(exc)}"


def convert_message(data: bytes, options: ConvertOptions) -> Hl7v2Event:
    """Parse, validate the header and map one message, exactly as the pipeline does
    (minus the accepted-type check). Raises what the pipeline would reject on."""
    message = parse_message(data)
    validate_header(message.header)
    return hl7v2_event(
        message,
        instance_id=None,
        mapping=options.mapping,
        strict_mapping=options.strict_mapping,
    )


def convert_batches(
    batches: Sequence[tuple[str, Sequence[bytes]]], options: ConvertOptions
) -> Iterator[Converted | NotConverted]:
    """Convert message after message; a failure is reported and the next one goes on."""
    for name, messages in batches:
        for index, data in enumerate(messages, start=1):
            try:
                described = convert_message(data, options)
            except Exception as exc:  # one bad message must not hide the others
                yield NotConverted(name, index, describe_error(exc))
            else:
                yield Converted(name, index, described)


def write_results(
    results: Iterator[Converted | NotConverted],
    *,
    out: IO[bytes],
    err: IO[str],
    data_only: bool = False,
    json_lines: bool = False,
) -> int:
    """Print each event (or only its Bundle) to ``out`` as it is converted, each
    failure to ``err``, then a count line. Returns the exit status."""
    option = 0 if json_lines else orjson.OPT_INDENT_2
    converted = failed = 0
    for result in results:
        if isinstance(result, NotConverted):
            failed += 1
            print(result.line(), file=err, flush=True)
            continue
        document = result.described.data if data_only else result.structured()
        try:
            payload = orjson.dumps(document, option=option)
        except TypeError as exc:  # orjson.JSONEncodeError: a value JSON cannot carry
            failed += 1
            reason = (
                f"the FHIR data cannot be written as JSON (a bridge defect): {type(exc).__name__}"
            )
            print(NotConverted(result.file, result.index, reason).line(), file=err, flush=True)
            continue
        converted += 1
        out.write(payload + b"\n")
        out.flush()
    print(f"{converted} converted, {failed} not converted", file=err, flush=True)
    return EXIT_CONVERTED if failed == 0 else EXIT_NOT_CONVERTED


def convert_files(
    paths: Sequence[Path],
    options: ConvertOptions,
    *,
    data_only: bool = False,
    json_lines: bool = False,
    out: IO[bytes] | None = None,
    err: IO[str] | None = None,
) -> int:
    """``hl7bridge convert``: 0 if every message converted, 1 if any did not.

    Raises :class:`ConfigError` (exit 2) for a file that cannot be read.
    """
    batches = read_files(paths)
    return write_results(
        convert_batches(batches, options),
        out=sys.stdout.buffer if out is None else out,
        err=sys.stderr if err is None else err,
        data_only=data_only,
        json_lines=json_lines,
    )
