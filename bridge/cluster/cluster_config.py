"""The cluster-wide configuration: one document, versioned in ZooKeeper.

Instance settings (:mod:`bridge.config`) say how one process starts; this model
says what the whole cluster does: which message types it accepts, the directory
channels it polls (each owned by one instance at a time), the diagnosis rules
and the topic routes. Operators push it with ``hl7bridge config push FILE``
(YAML or JSON); :mod:`bridge.cluster.config_store` keeps every version.

As with the settings, unknown keys are refused everywhere, and an error names
the key path (``channels[0].poll_interval_s``) and the problem, never a traceback.
The JSON Schema is ``schemas/cluster-config.schema.json``; regenerate it with
``python -m bridge.cluster.cluster_config > schemas/cluster-config.schema.json``.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bridge.errors import ConfigError

SCHEMA_ID = "https://hl7bridge.example/schemas/cluster-config.schema.json"

_SLUG = r"^[a-z0-9][a-z0-9-]{0,62}$"
_TOPIC_SUFFIX = r"^[a-z0-9][a-z0-9._-]{0,100}$"
_ACCEPT_ENTRY = r"^([A-Z0-9]{3}(\^[A-Z0-9]{3})?|\*)$"
_MESSAGE_TYPE = r"^[A-Z0-9]{3}(\^[A-Z0-9]{3})?$"
_ROUTE_MATCH = r"^([A-Z0-9]{3}(\^[A-Z0-9]{3})?|fhir:[A-Z][A-Za-z]{1,63})$"
_RESOURCE_TYPE = r"^[A-Z][A-Za-z]{1,63}$"
_CODE = r"^([^\s|]+\|)?[^\s|]+( [^\s|]+)*$"
_INTERPRETATION = r"^[A-Za-z<>-]{1,16}$"
_TOKEN = r"^\S{1,200}$"
_ABSOLUTE = r"^/"

#: What a value failing each pattern should have been, for error messages.
_PATTERN_PROBLEMS = {
    _SLUG: "must be 1-63 lower-case letters, digits or '-', starting with a letter or digit",
    _TOPIC_SUFFIX: "must be 1-101 lower-case letters, digits, '.', '_' or '-', "
    "starting with a letter or digit",
    _ACCEPT_ENTRY: "must be '*', a family like ADT or a type like ADT^A01",
    _MESSAGE_TYPE: "must be a family like ORU or a type like ORU^R01",
    _ROUTE_MATCH: "must be a family like ORU, a type like ADT^A01 or fhir:<ResourceType>",
    _RESOURCE_TYPE: "must be a FHIR resource type like Observation",
    _CODE: "must be 'system|code' or 'code'",
    _INTERPRETATION: "must be an interpretation code like HH, LL or AA",
    _TOKEN: "must be a non-empty value without spaces",
    _ABSOLUTE: "must be an absolute path like /var/spool/hl7/lab",
}

Slug = Annotated[str, Field(pattern=_SLUG)]
AcceptEntry = Annotated[str, Field(pattern=_ACCEPT_ENTRY)]
MessageType = Annotated[str, Field(pattern=_MESSAGE_TYPE)]
Code = Annotated[str, Field(pattern=_CODE)]
Interpretation = Annotated[str, Field(pattern=_INTERPRETATION)]
Token = Annotated[str, Field(pattern=_TOKEN)]
AbsolutePath = Annotated[str, Field(pattern=_ABSOLUTE)]


def _duplicates(values: list[str]) -> list[str]:
    return sorted(value for value, count in Counter(values).items() if count > 1)


def _unique(values: list[str], message: str) -> None:
    """Raise ``message: [names]`` when a name is used more than once."""
    twice = _duplicates(values)
    if twice:
        raise ValueError(f"{message}: {twice}")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class DirectoryChannelConfig(_Model):
    """A directory inbox: files matching ``pattern`` are read as HL7 v2 messages.

    One instance of the cluster owns a channel at a time. A file is moved to
    ``done_dir`` once its messages are accepted, to ``error_dir`` if it cannot be.
    """

    name: Slug
    """Channel name: lower-case letters, digits and '-', at most 63 characters."""
    kind: Literal["directory"] = "directory"
    """The channel kind; ``directory`` is the only one so far."""
    path: AbsolutePath
    """Absolute path of the inbox directory (the same path on every instance)."""
    pattern: str = "*"
    """Glob of the file names to pick up in the inbox (no '/'), e.g. ``*.hl7``."""
    done_dir: AbsolutePath | None = None
    """Absolute path where processed files go. Default ``<path>/done``."""
    error_dir: AbsolutePath | None = None
    """Absolute path where files that could not be processed go. Default ``<path>/error``."""
    poll_interval_s: float = Field(default=1.0, gt=0, le=3600)
    """How often the inbox is listed."""
    settle_s: float = Field(default=1.0, ge=0)
    """A file must be unchanged (size and modification time) this long before it is picked
    up, so a file still being written is never read half-way."""
    enabled: bool = True
    """A disabled channel is kept in the configuration but not polled."""

    @field_validator("pattern")
    @classmethod
    def _glob(cls, value: str) -> str:
        if not value or "/" in value or "\x00" in value:
            raise ValueError("must be a non-empty file name glob without '/', e.g. *.hl7")
        return value

    @model_validator(mode="after")
    def _dirs_differ(self) -> DirectoryChannelConfig:
        inbox = posixpath.normpath(self.path)
        for key, value in (("done_dir", self.done_path), ("error_dir", self.error_path)):
            if posixpath.normpath(value) == inbox:
                raise ValueError(f"{key} must not be the inbox itself ({self.path})")
        return self

    @property
    def done_path(self) -> str:
        """Where processed files go (``done_dir`` or ``<path>/done``)."""
        return self.done_dir or posixpath.join(self.path, "done")

    @property
    def error_path(self) -> str:
        """Where failed files go (``error_dir`` or ``<path>/error``)."""
        return self.error_dir or posixpath.join(self.path, "error")


class RuleMatch(_Model):
    """What a diagnosis rule matches. Every criterion given must match (AND); within a
    list, any entry may match (OR). At least one criterion must be given."""

    resource_type: Annotated[str, Field(pattern=_RESOURCE_TYPE)] | None = None
    """FHIR resource type, e.g. ``Observation``."""
    codes: list[Code] = []
    """Codes of the resource: ``system|code`` or just ``code`` (any system)."""
    interpretation: list[Interpretation] = []
    """Observation interpretation codes, e.g. ``HH``, ``LL``, ``AA``."""
    encounter_class: list[Token] = []
    """Encounter class codes, e.g. ``EMER``, ``IMP``."""
    message_type: list[MessageType] = []
    """HL7 v2 message types (``ORU^R01``) or families (``ORU``) the event came from."""
    source: list[Token] = []
    """Event sources (the CloudEvents ``source`` of the event)."""

    @model_validator(mode="after")
    def _not_empty(self) -> RuleMatch:
        if self.resource_type is None and not any(
            (self.codes, self.interpretation, self.encounter_class, self.message_type, self.source)
        ):
            raise ValueError("must give at least one criterion (resource_type, codes, ...)")
        return self


class DiagnosisRule(_Model):
    """A rule that raises a diagnosis for events that match it."""

    name: Slug
    """Rule name: lower-case letters, digits and '-', at most 63 characters."""
    priority: int = Field(default=5, ge=1, le=9)
    """1 (highest) to 9 (lowest)."""
    escalation_s: float = Field(default=300.0, gt=0)
    """A diagnosis not acknowledged within this many seconds is escalated."""
    match: RuleMatch
    """What the rule matches."""


class Route(_Model):
    """Sends the events of some messages to their own topic."""

    match: Annotated[str, Field(pattern=_ROUTE_MATCH)]
    """A message family (``ORU``), an exact type (``ADT^A01``) or ``fhir:<ResourceType>``
    for FHIR REST ingest (``fhir:Observation``)."""
    topic_suffix: Annotated[str, Field(pattern=_TOPIC_SUFFIX)]
    """Matching events go to ``<prefix>.events.<suffix>`` instead of ``<prefix>.events``."""


class ClusterConfig(_Model):
    """The configuration shared by every instance of a cluster (kept in ZooKeeper)."""

    accept_message_types: list[AcceptEntry] | None = None
    """Overrides every instance's ``accept_message_types`` when set. Families (``ADT``),
    exact types (``ADT^A01``) or ``*`` for all."""
    channels: list[DirectoryChannelConfig] = []
    """Directory channels; names are unique."""
    diagnosis_rules: list[DiagnosisRule] = []
    """Diagnosis rules; names are unique. None given: the built-in ``critical-results``
    rule (Observations interpreted HH, LL or AA) applies."""
    routes: list[Route] = []
    """Topic routes; each ``match`` at most once."""

    @field_validator("accept_message_types")
    @classmethod
    def _accept(cls, values: list[str] | None) -> list[str] | None:
        if values is None:
            return None
        if not values:
            raise ValueError("must name at least one message type (or '*'), or be left out")
        return values

    @field_validator("channels")
    @classmethod
    def _unique_channels(cls, values: list[DirectoryChannelConfig]) -> list[DirectoryChannelConfig]:
        _unique([c.name for c in values], "channel names must be unique; used more than once")
        return values

    @field_validator("diagnosis_rules")
    @classmethod
    def _unique_rules(cls, values: list[DiagnosisRule]) -> list[DiagnosisRule]:
        _unique([r.name for r in values], "rule names must be unique; used more than once")
        return values

    @field_validator("routes")
    @classmethod
    def _unique_routes(cls, values: list[Route]) -> list[Route]:
        _unique([r.match for r in values], "each route match may appear once; more than once")
        return values

    def canonical(self) -> dict[str, Any]:
        """The content as plain JSON data, every field given (what is stored and digested)."""
        return self.model_dump(mode="json")


#: The rule that applies when the configuration has none.
CRITICAL_RESULTS = DiagnosisRule(
    name="critical-results",
    match=RuleMatch(resource_type="Observation", interpretation=["HH", "LL", "AA"]),
)


def effective_rules(config: ClusterConfig) -> list[DiagnosisRule]:
    """The configured diagnosis rules, or ``[critical-results]`` when there are none."""
    return list(config.diagnosis_rules) or [CRITICAL_RESULTS]


# --- parsing ----------------------------------------------------------------------------


def _key_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _problem(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "string_pattern_mismatch":
        problem = _PATTERN_PROBLEMS.get(error.get("ctx", {}).get("pattern", ""))
        if problem is not None:
            return problem
    return str(error["msg"]).removeprefix("Value error, ")


def parse_cluster_config(data: bytes | str | Mapping[str, Any], *, where: str) -> ClusterConfig:
    """Validate a cluster configuration given as YAML or JSON text (or already parsed).

    Raises :class:`ConfigError` naming ``where``, the key path and the problem, e.g.
    ``invalid cluster config in lab.yaml: channels[0].poll_interval_s: Input should
    be greater than 0``.
    """
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ConfigError(
                f"cluster config in {where} is not UTF-8 text", key="config"
            ) from None
    if isinstance(data, str):
        try:
            document = yaml.safe_load(data)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise ConfigError(
                f"cluster config in {where} is not valid YAML or JSON{at}: {problem}",
                key="config",
            ) from None
        if document is None:
            raise ConfigError(f"cluster config in {where} is empty", key="config")
    else:
        document = data
    if not isinstance(document, Mapping):
        raise ConfigError(
            f"cluster config in {where} must be a mapping of keys "
            f"(accept_message_types, channels, diagnosis_rules, routes)",
            key="config",
        )
    try:
        return ClusterConfig.model_validate(dict(document))
    except ValidationError as exc:
        problems = []
        first: str | None = None
        for error in exc.errors():
            key = _key_path(error["loc"]) or "(top level)"
            first = first or key
            problems.append(f"{key}: {_problem(error)}")
        raise ConfigError(
            f"invalid cluster config in {where}: " + "; ".join(problems), key=first
        ) from None


def json_schema() -> dict[str, Any]:
    """The JSON Schema document of :class:`ClusterConfig` (``schemas/cluster-config...``)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **ClusterConfig.model_json_schema(),
    }


if __name__ == "__main__":  # pragma: no cover - regenerates the schema file
    print(json.dumps(json_schema(), indent=2, ensure_ascii=False))
