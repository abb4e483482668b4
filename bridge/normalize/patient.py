"""PID (and PD1) → Patient, shared by every message family.

The Patient id is derived from the patient key (first PID-3 identifier with its
authority), so every message about one patient yields the same Patient id.
"""

from __future__ import annotations

from typing import Any, Final

from adapters.hl7v2.er7 import patient_identifiers, patient_key_from

from . import datatypes as dt
from .context import MappingContext, Segment
from .ids import patient_resource_id

#: HL7 table 0001 (administrative sex) → FHIR administrative-gender.
GENDER: Final[dict[str, str]] = {
    "M": "male",
    "F": "female",
    "O": "other",
    "U": "unknown",
    "A": "other",
    "N": "other",
}


def map_patient(ctx: MappingContext, pid: Segment) -> str:
    """Add the Patient of ``pid`` to the Bundle; return its reference."""
    identifiers = patient_identifiers(ctx.msg)
    key = patient_key_from(identifiers)
    patient_id = patient_resource_id(key) if key else ctx.resource_id("Patient")
    patient: dict[str, Any] = {"resourceType": "Patient", "id": patient_id}
    pid.consume(1)  # set id

    found = [x for x in (dt.identifier(ctx, pid.comps(3, i)) for i in range(len(pid.reps(3)))) if x]
    # PID-2 (external id) and PID-4 (alternate id) are retained in v2.3-2.5 messages.
    for n in (2, 4):
        found += [
            x for x in (dt.identifier(ctx, pid.comps(n, i)) for i in range(len(pid.reps(n)))) if x
        ]
    if found:
        patient["identifier"] = found

    names = [x for c in pid.each(5) if (x := dt.human_name(c))]
    if names:
        patient["name"] = names

    telecom = [
        x
        for x in (dt.contact_point(pid.comps(13, i), "home") for i in range(len(pid.reps(13))))
        if x
    ] + [
        x
        for x in (dt.contact_point(pid.comps(14, i), "work") for i in range(len(pid.reps(14))))
        if x
    ]
    if telecom:
        patient["telecom"] = telecom

    gender = GENDER.get(pid.value(8).upper())
    if gender:
        patient["gender"] = gender

    birth = dt.date_only(pid.value(7), "PID-7")
    if birth:
        patient["birthDate"] = birth

    addresses = [x for c in pid.each(11) if (x := dt.address(c))]
    if addresses:
        patient["address"] = addresses

    reference = ctx.add(patient)
    ctx.patient_ref = reference
    return reference
