"""The state of one HL7 v2 → FHIR mapping: segments, the Bundle being built, and
what the mapping carried, so that what it did not carry can be reported.

Nothing is dropped silently: every field a mapper reads through
:class:`Segment` is marked as carried; at the end :meth:`MappingContext.unmapped`
lists every non-empty field no mapper read (``PID-13``) and every segment none
touched (``ZPI``). Fields that carry only structure (set ids, MSH-1/2) are
marked with :meth:`Segment.consume`.

Ids are deterministic: a resource's id is a UUIDv5 of the event id and a key
the mapper chooses (``Observation/2``), or of a business identity when one
exists (the patient key, a practitioner's id and authority), so the same
patient or practitioner in two messages gets the same id.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import compress
from typing import Any

from adapters.hl7v2.er7 import EncodingChars, Hl7Message

from .ids import uuid5_str


@dataclass(frozen=True, slots=True)
class MappingOptions:
    """Deployment choices that change the output (documented in the README)."""

    #: Assigning authority namespace (CX-4.1 / HD-1) → identifier system URI.
    identifier_systems: dict[str, str] = field(default_factory=dict)
    #: IANA time zone of timestamps sent without an offset (the senders' local time).
    default_timezone: str = "UTC"


class Segment:
    """One segment of the message, with read marks for unmapped-content reporting.

    Field numbers are HL7's: ``seg.raw(3)`` is PID-3. For MSH, ``raw(1)`` is the
    field separator and ``raw(2)`` the encoding characters, as in the standard.
    """

    __slots__ = ("_ctx", "carried", "fields", "index", "name")

    def __init__(self, ctx: MappingContext, index: int, fields: list[str]) -> None:
        self._ctx = ctx
        self.index = index
        self.fields = fields
        self.name = fields[0]
        #: The fields read or consumed, as a bit mask (bit n: field n). An int, not
        #: a set: marking is the commonest operation of the mapping (hot path), and
        #: the family fast paths can mark several fields with one ``|=``.
        self.carried = 0

    def __repr__(self) -> str:  # never the content: it is patient data
        return f"<Segment {self.name} #{self.index} fields={len(self.fields) - 1}>"

    @property
    def touched(self) -> bool:
        return self.carried != 0

    def consume(self, *numbers: int) -> None:
        """Mark fields as carried without reading them (set ids, structure)."""
        carried = self.carried
        for n in numbers:
            carried |= 1 << n
        self.carried = carried

    def consume_all(self) -> None:
        self.carried |= (1 << len(self.fields)) - 2  # fields 1 .. len-1

    def raw(self, n: int) -> str:
        """Field ``n`` as it stands in the message (all repetitions, escapes kept)."""
        self.carried |= 1 << n
        fields = self.fields
        return fields[n] if n < len(fields) else ""

    def reps(self, n: int) -> list[str]:
        """The non-empty repetitions of field ``n``."""
        self.carried |= 1 << n
        fields = self.fields
        value = fields[n] if n < len(fields) else ""
        if not value:
            return []
        sep = self._ctx.rep_sep
        if sep not in value:
            return [value]
        return [r for r in value.split(sep) if r]

    def each(self, n: int) -> list[Components]:
        """The components of every non-empty repetition of field ``n``."""
        self.carried |= 1 << n
        fields = self.fields
        value = fields[n] if n < len(fields) else ""
        if not value:
            return []
        ctx = self._ctx
        sep = ctx.rep_sep
        if sep not in value:  # one repetition, the common case: no comprehension
            return [Components(ctx, value)]
        return [Components(ctx, r) for r in value.split(sep) if r]

    def comps(self, n: int, rep: int = 0) -> Components:
        """The components of one repetition of field ``n``."""
        self.carried |= 1 << n
        fields = self.fields
        value = fields[n] if n < len(fields) else ""
        ctx = self._ctx
        if rep == 0 and ctx.rep_sep not in value:  # one repetition, the common case
            return Components(ctx, value)
        reps = self.reps(n)
        return Components(ctx, reps[rep] if rep < len(reps) else "")

    def value(self, n: int, component: int = 1) -> str:
        """Decoded text of component ``component`` of the first repetition."""
        return self.comps(n).text(component)

    def present(self, n: int) -> bool:
        """Whether field ``n`` has content (does not mark it)."""
        return n < len(self.fields) and bool(self.fields[n])

    def unused(self) -> list[int]:
        carried = self.carried | 1  # field 0 is the name
        fields = self.fields
        # compress() walks the (mostly empty) fields in C; only non-empty ones get here.
        return [
            n
            for n in compress(range(len(fields)), fields)
            if not carried >> n & 1 and fields[n] != '""'
        ]


class Components:
    """The components of one field repetition; 1-based like HL7 (CWE.1 is ``text(1)``)."""

    __slots__ = ("_ctx", "_parts", "raw")

    def __init__(self, ctx: MappingContext, raw: str) -> None:
        self._ctx = ctx
        self.raw = raw
        sep = ctx.comp_sep
        self._parts = raw.split(sep) if sep in raw else [raw]

    def __bool__(self) -> bool:
        return bool(self.raw)

    def __len__(self) -> int:
        return len(self._parts) if self.raw else 0

    def part(self, i: int) -> str:
        """Component ``i`` raw (subcomponents and escapes kept)."""
        parts = self._parts
        return parts[i - 1] if 0 < i <= len(parts) else ""

    def text(self, i: int, sub: int = 1) -> str:
        """Component ``i``, subcomponent ``sub``, escapes decoded, stripped."""
        parts = self._parts
        if not 0 < i <= len(parts):
            return ""
        value = parts[i - 1]
        if not value:
            return ""
        ctx = self._ctx
        sep = ctx.sub_sep
        if sep in value:
            subs = value.split(sep)
            value = subs[sub - 1] if 0 < sub <= len(subs) else ""
        elif sub != 1:
            return ""
        # Most values have no escape: skip the decode call (hot path).
        if ctx.esc_char in value:
            value = ctx.decode(value)
        return value.strip()

    def texts(self, count: int) -> list[str]:
        """``[text(1), ..., text(count)]`` (at least ``count`` items, ``""`` padded).

        One call for the datatype maps that read most components of a field
        (names, addresses, codes: the hot path); a value with no subcomponent and
        no escape, nearly all of them, is only split and stripped.
        """
        parts = self._parts
        ctx = self._ctx
        raw = self.raw
        sub, esc = ctx.sub_sep, ctx.esc_char
        if sub in raw or esc in raw:
            # text(i) inlined: a loop, not map(self.text), which calls back from C.
            out = []
            for value in parts:
                if sub in value:
                    value = value.split(sub, 1)[0]
                if esc in value:
                    value = ctx.decode(value)
                out.append(value.strip())
        else:  # map, not a comprehension: no frame of its own (Python 3.11)
            out = list(map(str.strip, parts))
        if len(out) < count:
            out += [""] * (count - len(out))
        return out

    def subs(self, i: int) -> Components:
        """Component ``i`` seen as components of its own (its subcomponents)."""
        return Components.of_subcomponents(self._ctx, self.part(i))

    @classmethod
    def of_subcomponents(cls, ctx: MappingContext, raw: str) -> Components:
        inst = cls.__new__(cls)
        inst._ctx = ctx
        inst.raw = raw
        sep = ctx.sub_sep
        inst._parts = raw.split(sep) if sep in raw else [raw]
        return inst


class MappingContext:
    """Everything one message's mapping reads and writes."""

    def __init__(self, msg: Hl7Message, event_id: str, options: MappingOptions) -> None:
        self.msg = msg
        self.enc: EncodingChars = msg.encoding
        # The delimiters as plain attributes: read on every field access (hot path).
        self.rep_sep: str = self.enc.repetition
        self.comp_sep: str = self.enc.component
        self.sub_sep: str = self.enc.subcomponent
        self.esc_char: str = self.enc.escape
        self.event_id = event_id
        self.options = options
        self.decode = msg.decode_escapes
        self.segments = [Segment(self, i, fields) for i, fields in enumerate(msg.segments)]
        self.entries: list[dict[str, Any]] = []
        self._by_id: dict[str, dict[str, Any]] = {}
        #: The Patient reference (``urn:uuid:...``) once the patient is mapped.
        self.patient_ref: str | None = None
        #: The Encounter reference once PV1 is mapped.
        self.encounter_ref: str | None = None
        #: Per-message memo of the family mappers (a practitioner mapped once per
        #: message, a repeated SPM...), keyed by a name the family chooses. It
        #: lives and dies with the message, so nothing leaks from one to the next.
        self.memo: dict[str, Any] = {}

    # --- segments -------------------------------------------------------------------

    def first(self, name: str) -> Segment | None:
        for seg in self.segments:
            if seg.name == name:
                return seg
        return None

    def all(self, name: str) -> list[Segment]:
        return [seg for seg in self.segments if seg.name == name]

    def after(
        self, anchor: Segment, names: Iterable[str], stop: Iterable[str]
    ) -> Iterator[Segment]:
        """Segments named ``names`` following ``anchor`` until one named in ``stop``."""
        wanted, stops = frozenset(names), frozenset(stop)
        for seg in self.segments[anchor.index + 1 :]:
            if seg.name in stops:
                return
            if seg.name in wanted:
                yield seg

    # --- resources -------------------------------------------------------------------

    def resource_id(self, key: str) -> str:
        """A deterministic id for a resource of this event (``key`` names it within)."""
        return uuid5_str(f"{self.event_id}/{key}")

    def add(self, resource: dict[str, Any]) -> str:
        """Put a resource in the Bundle once (by id); return its reference."""
        rid = resource["id"]
        reference = f"urn:uuid:{rid}"
        existing = self._by_id.get(rid)
        if existing is None:
            self._by_id[rid] = resource
            self.entries.append({"fullUrl": reference, "resource": resource})
        elif existing is not resource:
            _merge_missing(existing, resource)
        return reference

    def get(self, reference: str) -> dict[str, Any] | None:
        return self._by_id.get(reference.removeprefix("urn:uuid:"))

    def has_id(self, rid: str) -> bool:
        """Whether a resource with id ``rid`` is in the Bundle already."""
        return rid in self._by_id

    # --- reporting -------------------------------------------------------------------

    def unmapped(self) -> list[str]:
        """Segments no mapper touched (``ZPI``) and fields none read (``PID-13``).

        In message order, each name once. Empty fields and ``""`` (HL7's explicit
        null) are not content and never listed.
        """
        out: dict[str, None] = {}
        for seg in self.segments:
            carried = seg.carried
            if not carried:
                if any(seg.fields[1:]):
                    out[seg.name] = None
                continue
            fields = seg.fields
            if ((1 << len(fields)) - 2) & ~carried == 0:
                continue  # every field carried (consume_all)
            name = seg.name
            carried |= 1  # field 0 is the name
            # Inlined Segment.unused (hot path); compress() skips the empty fields in C.
            for n in compress(range(len(fields)), fields):
                if not carried >> n & 1 and fields[n] != '""':
                    out[f"{name}-{n}"] = None
        return list(out)


def _merge_missing(target: dict[str, Any], extra: dict[str, Any]) -> None:
    """The same resource seen twice (a practitioner in PV1-7 and OBR-16): keep the
    first, add what only the second has."""
    for key, value in extra.items():
        if key not in target:
            target[key] = value
