"""FHIR R4 JSON in, a validated resource or the OperationOutcome issues out (no I/O).

Validation is fhir.resources' R4B models (structure, cardinality, primitive
formats, unknown elements, choice types) plus what they leave out and a relay
must not: every ``Reference.reference`` is a literal FHIR reference (``Type/id``
of a known type, an absolute URL, ``urn:uuid:`` / ``urn:oid:``, or ``#id`` of a
contained resource), ``urn:`` references resolve inside the Bundle that carries
them, ``#`` references resolve to a contained resource, and the top-level
references of a resource point at a type its definition allows.

Each problem is one :class:`Issue` whose ``expression`` is a FHIRPath to the
element (``Observation.code.coding[0].system``) and whose text says what is
wrong, never the value that was sent (issues are logged and counted; values are
patient data).
"""

from __future__ import annotations

import datetime
import decimal
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Final, Literal

import orjson
from fhir.resources.R4B import get_fhir_model_class
from fhir_core.fhirabstractmodel import FHIRAbstractModel
from pydantic import ValidationError

from adapters.fhir.resource_types import RESOURCE_TYPES

#: R4 ``id``: 1-64 of letters, digits, '-' and '.'.
ID_RE: Final = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_RELATIVE_RE: Final = re.compile(
    r"(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?"
)
_ABSOLUTE_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://\S+")
_UUID_RE: Final = re.compile(r"urn:uuid:[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_OID_RE: Final = re.compile(r"urn:oid:[0-2](?:\.(?:0|[1-9][0-9]*))+")
#: A pydantic location part that names a validator, not an element.
_NOT_AN_ELEMENT: Final = re.compile(r"[^A-Za-z0-9_]")
_CHOICE_RE: Final = re.compile(r"\[([^\]]*)\]")


@dataclass(frozen=True, slots=True)
class Issue:
    """One OperationOutcome.issue."""

    code: str
    diagnostics: str
    expression: str | None = None
    severity: str = "error"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"severity": self.severity, "code": self.code}
        out["diagnostics"] = self.diagnostics
        if self.expression:
            out["expression"] = [self.expression]
        return out


def operation_outcome(issues: Sequence[Issue]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [i.to_json() for i in issues]}


class FhirRequestError(Exception):
    """A request the bridge refuses: its HTTP status and the issues that say why."""

    def __init__(self, status: int, issues: Sequence[Issue]) -> None:
        super().__init__(f"HTTP {status}: " + "; ".join(i.diagnostics for i in issues))
        self.status = status
        self.issues = list(issues)

    @classmethod
    def one(
        cls, status: int, code: str, diagnostics: str, expression: str | None = None
    ) -> FhirRequestError:
        return cls(status, [Issue(code, diagnostics, expression)])

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.issues)


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object with a ``resourceType``; 400 otherwise."""
    if not body.strip():
        raise FhirRequestError.one(400, "structure", "the request has no body")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # orjson's message names the position only, never the content.
        raise FhirRequestError.one(400, "structure", f"the body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise FhirRequestError.one(400, "structure", "the body is not a JSON object")
    resource_type = value.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        raise FhirRequestError.one(
            400, "required", "the body has no resourceType: it is not a FHIR resource"
        )
    return value


def is_resource_type(name: str) -> bool:
    return name in RESOURCE_TYPES


@cache
def model_class(resource_type: str) -> type[FHIRAbstractModel]:
    return get_fhir_model_class(resource_type)


def errors_in(issues: Sequence[Issue]) -> bool:
    return any(i.severity in ("error", "fatal") for i in issues)


def validate_resource(
    resource: Mapping[str, Any],
    *,
    path: str | None = None,
    bundle_urls: frozenset[str] | None = None,
    conditional_references: bool = False,
) -> list[Issue]:
    """Every problem of one resource (valid when none is an error: see
    :func:`errors_in`; warnings go back with the answer). ``path`` prefixes the FHIRPath
    of each issue (``Bundle.entry[2].resource``); ``bundle_urls`` are the fullUrls a
    ``urn:`` reference may point at; ``conditional_references`` allows ``Type?query``
    (transactions)."""
    resource_type = resource.get("resourceType")
    root = path or str(resource_type)
    if not isinstance(resource_type, str) or not is_resource_type(resource_type):
        return [
            Issue(
                "not-supported", "unknown resourceType: not an R4 resource", f"{root}.resourceType"
            )
        ]
    issues: list[Issue] = []
    try:
        model_class(resource_type).model_validate(resource)
    except ValidationError as exc:
        issues.extend(_issues_from(exc, root))
    except RecursionError:
        return [Issue("too-costly", "the resource is nested too deeply to validate", root)]
    except (KeyError, ValueError, TypeError):
        # fhir.resources fails outside pydantic on some shapes (an unknown resourceType
        # inside a resource): the JSON checks below name the element; this says it
        # only if they do not.
        broken = Issue("structure", "the resource does not have FHIR's structure", root)
        found = _json_type_issues(resource, resource_type, root)
        return [*(found if errors_in(found) else [broken, *found])]
    # fhir.resources coerces ("yes" → true, "7" → 7); FHIR JSON does not.
    reported = {i.expression for i in issues}
    issues.extend(
        i for i in _json_type_issues(resource, resource_type, root) if i.expression not in reported
    )
    issues.extend(
        _reference_issues(resource, root, bundle_urls or frozenset(), conditional_references)
    )
    return issues


# --- pydantic errors → issues ---------------------------------------------------------


def _issues_from(exc: ValidationError, root: str) -> Iterator[Issue]:
    for error in exc.errors(include_url=False, include_input=False):
        kind = str(error.get("type", ""))
        message = str(error.get("msg", "invalid"))
        parts = [p for p in error.get("loc", ()) if _is_element(p)]
        expression = _fhirpath(root, parts)
        if kind == "extra_forbidden":
            yield Issue("structure", "unknown element: not part of this resource", expression)
        elif kind.endswith("missing"):
            yield Issue("required", "required element missing", expression)
        elif "Any of one field value is expected" in message:
            choice = _choice_name(message)
            where = f"{expression}.{choice}" if choice else expression
            yield Issue("structure", "more than one type given for a choice element", where)
        else:
            yield Issue("value", message.removeprefix("Value error, "), expression)


def _is_element(part: object) -> bool:
    """A location part naming an element (fhir.resources adds ``root`` and validator
    labels; no FHIR element is called ``root``)."""
    if isinstance(part, int):
        return True
    return isinstance(part, str) and part != "root" and not _NOT_AN_ELEMENT.search(part)


def _fhirpath(root: str, parts: Sequence[str | int]) -> str:
    out = [root]
    for part in parts:
        if isinstance(part, int):
            out[-1] += f"[{part}]"
        else:
            out.append(part.removesuffix("__ext"))
    return ".".join(out)


def _choice_name(message: str) -> str:
    """``value[x]`` from fhir.resources' "expected from this list ['valueBoolean', ...]"."""
    found = _CHOICE_RE.search(message)
    if not found:
        return ""
    names = [n.strip(" '\"") for n in found.group(1).split(",") if n.strip(" '\"")]
    if not names:
        return ""
    prefix = names[0]
    for name in names[1:]:
        while not name.startswith(prefix):
            prefix = prefix[:-1]
    return f"{prefix}[x]" if prefix else ""


# --- JSON types of primitives --------------------------------------------------------

Kind = Literal["boolean", "integer", "decimal", "string", "complex", "resource", "any"]
_JSON_NAME: Final = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}


_KINDS: dict[type[Any], dict[str, tuple[Kind, type[Any] | None]]] = {}
_REQUIRED: dict[type[Any], tuple[str, ...]] = {}


def _required_primitives(model: type[Any]) -> tuple[str, ...]:
    """Required primitive elements: fhir.resources checks them only when nothing else
    in the resource failed, so they are checked here too (one issue per problem)."""
    found = _REQUIRED.get(model)
    if found is None:
        found = tuple(
            field.alias or name
            for name, field in model.model_fields.items()
            if isinstance(field.json_schema_extra, Mapping)
            and field.json_schema_extra.get("element_required")
        )
        _REQUIRED[model] = found
    return found


def _element_kinds(model: type[Any]) -> dict[str, tuple[Kind, type[Any] | None]]:
    """JSON name → (what FHIR JSON has there, the complex type's model) for a model."""
    found = _KINDS.get(model)
    if found is None:
        found = {
            field.alias or name: _kind_of(field.annotation)
            for name, field in model.model_fields.items()
        }
        _KINDS[model] = found
    return found


def _kind_of(annotation: Any) -> tuple[Kind, type[Any] | None]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, typing.List):  # noqa: UP006
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _kind_of(inner[0]) if len(inner) == 1 else ("any", None)
    if origin is typing.Annotated:
        return _kind_of(typing.get_args(annotation)[0])
    if annotation is bool:
        return ("boolean", None)
    if annotation is int:
        return ("integer", None)
    if isinstance(annotation, type) and issubclass(annotation, (decimal.Decimal, float)):
        return ("decimal", None)
    if isinstance(annotation, type) and issubclass(
        annotation, (str, datetime.date, datetime.time, datetime.datetime)
    ):
        return ("string", None)
    get_model = getattr(annotation, "get_model_klass", None)
    if get_model is not None:
        model = get_model()
        if getattr(model, "__resource_type__", None) == "Resource":
            return ("resource", None)
        return ("complex", model)
    return ("any", None)


def _json_type_issues(resource: Mapping[str, Any], resource_type: str, root: str) -> list[Issue]:
    issues: list[Issue] = []
    _check_resource(resource, resource_type, root, issues)
    return issues


def _check_resource(
    resource: Mapping[str, Any], resource_type: str, path: str, issues: list[Issue]
) -> None:
    rid = resource.get("id")
    if rid is not None and not (isinstance(rid, str) and ID_RE.fullmatch(rid)):
        issues.append(Issue("value", "an id is 1-64 letters, digits, '-' and '.'", f"{path}.id"))
    _check_json_types(resource, model_class(resource_type), path, issues)


def _check_json_types(
    value: Mapping[str, Any], model: type[Any], path: str, issues: list[Issue]
) -> None:
    kinds = _element_kinds(model)
    for name in _required_primitives(model):
        if value.get(name) is None and f"_{name}" not in value:
            issues.append(Issue("required", "required element missing", f"{path}.{name}"))
    for key, item in value.items():
        spec = kinds.get(key)
        if spec is None:
            continue  # unknown elements are the model's to report; _x extensions too
        if isinstance(item, list):
            for i, element in enumerate(item):
                _check_one(element, spec, f"{path}.{key}[{i}]", issues)
        else:
            _check_one(item, spec, f"{path}.{key}", issues)


def _check_one(
    item: Any, spec: tuple[Kind, type[Any] | None], path: str, issues: list[Issue]
) -> None:
    kind, model = spec
    if item is None or kind == "any":
        return
    if kind == "boolean":
        ok = isinstance(item, bool)
    elif kind == "integer":
        ok = isinstance(item, int) and not isinstance(item, bool)
    elif kind == "decimal":
        ok = isinstance(item, (int, float)) and not isinstance(item, bool)
    elif kind == "string":
        ok = isinstance(item, str)
    elif kind == "resource":
        if not isinstance(item, Mapping):
            issues.append(Issue("value", "FHIR JSON has a resource (an object) here", path))
        elif not isinstance(item.get("resourceType"), str):
            issues.append(
                Issue("required", "a resource needs its resourceType", f"{path}.resourceType")
            )
        elif not is_resource_type(item["resourceType"]):
            issues.append(
                Issue(
                    "not-supported",
                    "unknown resourceType: not an R4 resource",
                    f"{path}.resourceType",
                )
            )
        else:
            _check_resource(item, item["resourceType"], path, issues)
        return
    else:
        if not isinstance(item, Mapping):
            sent = _JSON_NAME.get(type(item), "an array")
            issues.append(Issue("value", f"FHIR JSON has an object here, not {sent}", path))
        elif model is not None:
            _check_json_types(item, model, path, issues)
        return
    if not ok:
        sent = _JSON_NAME.get(type(item), "an object or array")
        issues.append(Issue("value", f"FHIR JSON has {_article(kind)} here, not {sent}", path))


def _article(kind: str) -> str:
    return {"integer": "an integer", "decimal": "a decimal number"}.get(kind, f"a {kind}")


# --- references -----------------------------------------------------------------------


def _reference_issues(
    resource: Mapping[str, Any],
    root: str,
    bundle_urls: frozenset[str],
    conditional: bool,
    container_ids: set[Any] | None = None,
) -> list[Issue]:
    """A contained resource's '#' references resolve among its container's
    contained resources (``container_ids``), the container's among its own."""
    contained = container_ids
    if contained is None:
        contained = {
            c.get("id")
            for c in resource.get("contained") or ()
            if isinstance(c, Mapping) and isinstance(c.get("id"), str)
        }
    issues: list[Issue] = []
    allowed = _allowed_targets(str(resource["resourceType"]))
    for key, value in resource.items():
        if key == "contained" and isinstance(value, list):
            for i, inner in enumerate(value):
                if isinstance(inner, Mapping) and isinstance(inner.get("resourceType"), str):
                    issues.extend(
                        _reference_issues(
                            inner, f"{root}.contained[{i}]", bundle_urls, conditional, contained
                        )
                    )
            continue
        targets = allowed.get(key)
        _walk(value, f"{root}.{key}", targets, contained, bundle_urls, conditional, issues)
    return issues


def _walk(
    value: Any,
    path: str,
    targets: frozenset[str] | None,
    contained: set[Any],
    bundle_urls: frozenset[str],
    conditional: bool,
    issues: list[Issue],
) -> None:
    if isinstance(value, list):
        for i, item in enumerate(value):
            _walk(item, f"{path}[{i}]", targets, contained, bundle_urls, conditional, issues)
        return
    if not isinstance(value, Mapping):
        return
    if isinstance(value.get("resourceType"), str):  # a resource inside (Bundle.entry)
        issues.extend(_reference_issues(value, path, bundle_urls, conditional))
        return
    reference = value.get("reference")
    if isinstance(reference, str):
        problem = _reference_problem(reference, contained, bundle_urls, conditional)
        if problem:
            issues.append(Issue("value", problem, f"{path}.reference"))
        elif targets is not None:
            relative = _RELATIVE_RE.fullmatch(reference)
            if relative is not None and relative.group("type") not in targets:
                # A warning, not a refusal: official R4 examples break this rule, and
                # the servers downstream decide how strict to be.
                issues.append(
                    Issue(
                        "value",
                        f"a reference to {relative.group('type')} where the definition "
                        f"allows {', '.join(sorted(targets))}",
                        f"{path}.reference",
                        severity="warning",
                    )
                )
    for key, inner in value.items():
        if isinstance(inner, (Mapping, list)):
            # Only the resource's own top-level references have known targets.
            _walk(inner, f"{path}.{key}", None, contained, bundle_urls, conditional, issues)


def _reference_problem(
    reference: str,
    contained: set[Any],
    bundle_urls: frozenset[str],
    conditional: bool,
) -> str | None:
    if reference.startswith("#"):
        if reference == "#" or reference[1:] in contained:
            return None
        return "a '#' reference to a contained resource this resource does not contain"
    if reference.startswith("urn:"):
        if not (_UUID_RE.fullmatch(reference) or _OID_RE.fullmatch(reference)):
            return "not a valid urn:uuid: or urn:oid: reference"
        if reference not in bundle_urls:
            return "a urn: reference that no entry of the enclosing Bundle has as its fullUrl"
        return None
    if _ABSOLUTE_RE.fullmatch(reference):
        return None
    relative = _RELATIVE_RE.fullmatch(reference)
    if relative is None:
        type_name, question, _ = reference.partition("?")
        if question and conditional and is_resource_type(type_name):
            return None
        return "not a literal reference (Type/id, an absolute URL, urn:uuid: or #id)"
    if not is_resource_type(relative.group("type")):
        return "a reference to an unknown resource type"
    return None


@cache
def _allowed_targets(resource_type: str) -> dict[str, frozenset[str]]:
    """Top-level element (JSON name) → the resource types its Reference may point at;
    absent when any type may (``Reference(Any)``) or the element is not a Reference."""
    out: dict[str, frozenset[str]] = {}
    if not is_resource_type(resource_type):
        return out  # reported by the JSON checks
    for name, field in model_class(resource_type).model_fields.items():
        extra = field.json_schema_extra
        if not isinstance(extra, Mapping):
            continue
        types = extra.get("enum_reference_types")
        if not isinstance(types, list) or not types or "Resource" in types:
            continue
        out[field.alias or name] = frozenset(str(t) for t in types)
    return out
