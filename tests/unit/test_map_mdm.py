"""MDM (T01-T11) → DocumentReference: hand-written messages, the corpus, and
Microsoft's expected output for MDM-T02-01."""

from __future__ import annotations

import base64
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from adapters.hl7v2.er7 import Hl7Message, parse_message
from bridge.errors import DataTypeError, RequiredFieldMissing, TableValueNotFound
from bridge.normalize.context import MappingContext, MappingOptions
from bridge.normalize.families.mdm import map_mdm
from tests.unit.mapping_support import (
    MS_SAMPLES,
    assert_references_resolve,
    expected_bundle,
    files_of_type,
    normalize_and_validate,
    resources,
)

pytestmark = pytest.mark.timeout(30)

MDM_FILES = files_of_type(MS_SAMPLES.glob("*.hl7"), "MDM")
SOURCE = "urn:hl7bridge:test:mllp"
PID = "PID|1||MRN123^^^HOSP^MR||Doe^Jane||19800101|F"
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj <<>> endobj\n%%EOF"


def msh(event: str = "T02", version: str = "2.5.1", charset: str = "") -> str:
    return (
        f"MSH|^~\\&|DICT|HOSP|EHR|HOSP|20240315101500+0100||MDM^{event}^MDM_{event}|C{event}|P|"
        f"{version}|||||{charset}"
    )


def txa(**fields: str) -> str:
    """A TXA with the usual fields; keyword ``f<n>`` overrides TXA-n."""
    values = {
        1: "1",
        2: "DS",
        3: "TX",
        4: "20240315090000+0100",
        6: "20240315093000+0100",
        9: "D100^Author^Alice^^^^^^HOSP",
        12: "DOC-1^DICT",
        17: "AU",
    }
    for key, value in fields.items():
        values[int(key[1:])] = value
    return "TXA|" + "|".join(values.get(n, "") for n in range(1, max(values) + 1))


def message(*segments: str, event: str = "T02", version: str = "2.5.1") -> Hl7Message:
    return parse_message("\r".join((msh(event, version), PID, *segments)).encode())


def run(msg: Hl7Message, event_id: str = "evt-1") -> tuple[dict[str, Any], tuple[str, ...]]:
    return normalize_and_validate(msg, event_id=event_id, source=SOURCE)


def doc_of(msg: Hl7Message, event_id: str = "evt-1") -> dict[str, Any]:
    bundle, _ = run(msg, event_id)
    docs = resources(bundle, "DocumentReference")
    assert len(docs) == 1
    return docs[0]


def attachments(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [c["attachment"] for c in doc["content"]]


def text_of(attachment: dict[str, Any]) -> str:
    return base64.b64decode(attachment["data"], validate=True).decode("utf-8")


# --- content --------------------------------------------------------------------------


def test_t02_ed_base64_pdf() -> None:
    payload = base64.b64encode(PDF).decode("ascii")
    doc = doc_of(
        message(
            txa(),
            f"OBX|1|ED|18842-5^Discharge summary^LN||^application^pdf^Base64^{payload}||||||F",
        )
    )
    [pdf] = attachments(doc)
    assert pdf["contentType"] == "application/pdf"
    assert base64.b64decode(pdf["data"], validate=True) == PDF
    assert pdf["title"] == "Discharge summary"
    assert pdf["creation"] == "2024-03-15T09:30:00+01:00"


def test_ed_hl7_table_codes_and_wrapped_base64() -> None:
    payload = base64.b64encode(PDF).decode("ascii")
    wrapped = payload[:20] + "\\.br\\" + payload[20:]
    doc = doc_of(message(txa(), f"OBX|1|ED|PDF^Report||HOSP^AP^PDF^Base64^{wrapped}||||||F"))
    [pdf] = attachments(doc)
    assert pdf["contentType"] == "application/pdf"
    assert pdf["data"] == payload


def test_ed_ascii_and_hex_encodings_become_base64() -> None:
    doc = doc_of(
        message(
            txa(),
            "OBX|1|ED|TXT^Text||^TEXT^PLAIN^A^Pulse 80\\F\\min, T 37\\S\\C||||||F",
            "OBX|2|ED|IMG^Image||^IM^PNG^Hex^89504E47 0D0A1A0A||||||F",
        )
    )
    ascii_part, hex_part = attachments(doc)
    assert ascii_part["contentType"] == "text/plain"
    assert text_of(ascii_part) == "Pulse 80|min, T 37^C"
    assert hex_part["contentType"] == "image/png"
    assert base64.b64decode(hex_part["data"]) == b"\x89PNG\r\n\x1a\n"


def test_ed_without_data_keeps_the_content_type() -> None:
    doc = doc_of(message(txa(), "OBX|1|ED|X^Scan||^image^jpeg^Base64^||||||F"))
    assert attachments(doc)[0]["contentType"] == "image/jpeg"
    assert "data" not in attachments(doc)[0]


def test_ed_of_unknown_type_is_octet_stream() -> None:
    doc = doc_of(message(txa(), "OBX|1|ED|X^Blob||^ZZ^^Base64^AAEC||||||F"))
    assert attachments(doc)[0]["contentType"] == "application/octet-stream"


@pytest.mark.parametrize(
    ("ed", "error", "location"),
    [
        ("^AP^PDF^Base64^not*base64", DataTypeError, "OBX-5.5"),
        ("^AP^PDF^Hex^XYZ", DataTypeError, "OBX-5.5"),
        ("^AP^PDF^UUE^AAAA", TableValueNotFound, "OBX-5.4"),
    ],
)
def test_bad_ed_data_is_rejected_with_its_location(
    ed: str, error: type[Exception], location: str
) -> None:
    with pytest.raises(error) as caught:
        run(message(txa(), f"OBX|1|ED|X^Y||{ed}||||||F"))
    assert caught.value.location == location  # type: ignore[attr-defined]
    assert "not*base64" not in str(caught.value)


def test_tx_lines_escapes_and_repetitions_make_one_utf8_text() -> None:
    doc = doc_of(
        message(
            txa(),
            "OBX|1|TX|REPORT^Report text||Patient: M\\XC3BC\\ller, temp 38\\XC2B0\\C||||||F",
            "OBX|2|TX|REPORT^Report text||Fields \\F\\ comps \\S\\ subs \\T\\ reps \\R\\ "
            "esc \\E\\||||||F",
            "OBX|3|TX|REPORT^Report text||||||||F",
            "OBX|4|TX|REPORT^Report text||first~~third||||||F",
        )
    )
    [text] = attachments(doc)
    assert text["contentType"] == "text/plain; charset=utf-8"
    assert text["title"] == "Report text"
    assert text_of(text) == (
        "Patient: Müller, temp 38°C\nFields | comps ^ subs & reps ~ esc \\\n\nfirst\n\nthird"
    )


def test_ft_formatting_commands_and_unicode_from_the_charset() -> None:
    segments = (
        msh("T02", "2.5.1", "8859/1"),
        PID,
        txa(),
        "OBX|1|FT|NOTE^Note||\\H\\Impression\\N\\:\\.br\\Müller is well.\\.sp2\\End||||||F",
    )
    msg = parse_message("\r".join(segments).encode("latin-1"))
    [text] = attachments(doc_of(msg))
    assert text_of(text) == "Impression:\nMüller is well.\n\nEnd"


def test_text_sections_with_different_identifiers_stay_apart() -> None:
    doc = doc_of(
        message(
            txa(),
            "OBX|1|TX|FIND^Findings||Lungs clear.||||||F",
            "OBX|2|TX|IMP^Impression||No acute disease.||||||F",
            "OBX|3|TX|FIND^Findings||Heart normal.||||||F",
        )
    )
    findings, impression = attachments(doc)
    assert (findings["title"], text_of(findings)) == ("Findings", "Lungs clear.\nHeart normal.")
    assert (impression["title"], text_of(impression)) == ("Impression", "No acute disease.")


def test_st_and_rp_and_notes() -> None:
    doc = doc_of(
        message(
            txa(),
            "OBX|1|ST|SUM^Summary||Short summary||||||F",
            "NTE|1||Reviewed \\T\\ signed",
            "OBX|2|RP|IMG^Images||https://pacs.example.org/view?id=1 2^PACS^image^jpeg||||||F",
        )
    )
    summary, image, notes = attachments(doc)
    assert text_of(summary) == "Short summary"
    assert image == {
        "url": "https://pacs.example.org/view?id=1%202",
        "contentType": "image/jpeg",
        "title": "Images",
        "creation": "2024-03-15T09:30:00+01:00",
    }
    assert notes["title"] == "Notes and comments"
    assert text_of(notes) == "Reviewed & signed"


def test_hd_instance_uid_is_a_related_reference() -> None:
    doc = doc_of(
        message(txa(), "OBX|1|HD|113014^DICOM Study^DCM||1.2.840.113619.2.55||||||O"),
        "evt-hd",
    )
    assert {
        "identifier": {"system": "urn:ietf:rfc:3986", "value": "urn:oid:1.2.840.113619.2.55"},
        "display": "DICOM Study",
    } in doc["context"]["related"]


def test_result_value_types_are_not_content_and_stay_unmapped() -> None:
    bundle, unmapped = run(
        message(txa(), "OBX|1|TX|R^Report||Body||||||F", "OBX|2|NM|8867-4^HR^LN||72|/min|||||F")
    )
    [doc] = resources(bundle, "DocumentReference")
    assert len(doc["content"]) == 1
    assert "OBX" in unmapped


# --- notifications without content ----------------------------------------------------


@pytest.mark.parametrize("event", ["T01", "T03", "T05", "T07", "T09", "T11"])
def test_notification_without_content_still_has_a_valid_attachment(event: str) -> None:
    bundle, _ = run(message(txa(f13="DOC-0^DICT"), event=event))
    [doc] = resources(bundle, "DocumentReference")
    assert attachments(doc) == [
        {
            "contentType": "text/plain; charset=utf-8",
            "title": "Discharge summary",
            "creation": "2024-03-15T09:30:00+01:00",
        }
    ]


def test_notification_without_presentation_uses_the_title() -> None:
    doc = doc_of(message(txa(f3="", f25="Cardiology consult"), event="T01"))
    assert attachments(doc)[0]["title"] == "Cardiology consult"
    assert "contentType" not in attachments(doc)[0]
    assert doc["description"] == "Cardiology consult"


# --- status, relations, identity ------------------------------------------------------


def test_t11_cancel_is_entered_in_error_on_the_same_document() -> None:
    original = doc_of(message(txa(), "OBX|1|TX|R^R||text||||||F"), "evt-a")
    cancel = doc_of(message(txa(), event="T11"), "evt-b")
    assert cancel["status"] == "entered-in-error"
    assert original["status"] == "current"
    assert cancel["id"] == original["id"]
    assert cancel["masterIdentifier"] == {
        "system": "urn:hl7bridge:authority:DICT",
        "value": "DOC-1",
    }


@pytest.mark.parametrize(
    ("completion", "doc_status"),
    [
        ("AU", "final"),
        ("LA", "final"),
        ("DO", "preliminary"),
        ("IP", "preliminary"),
        ("DI", "preliminary"),
        ("IN", "preliminary"),
        ("PA", "preliminary"),
    ],
)
def test_txa17_completion_status(completion: str, doc_status: str) -> None:
    doc = doc_of(message(txa(f17=completion), "OBX|1|TX|R^R||text||||||F"))
    assert doc["docStatus"] == doc_status
    assert "_docStatus" not in doc


def test_txa17_unknown_code_is_kept_as_an_alternate_code() -> None:
    doc = doc_of(message(txa(f17="ZZ"), "OBX|1|TX|R^R||text||||||F"))
    assert "docStatus" not in doc
    ext = doc["_docStatus"]["extension"][0]
    assert ext["url"] == "http://hl7.org/fhir/StructureDefinition/alternate-codes"
    assert ext["valueCodeableConcept"]["coding"] == [
        {"system": "http://terminology.hl7.org/CodeSystem/v2-0271", "code": "ZZ"}
    ]


@pytest.mark.parametrize(
    ("availability", "status"),
    [("AV", "current"), ("OB", "superseded"), ("CA", "entered-in-error"), ("UN", "current")],
)
def test_txa19_availability(availability: str, status: str) -> None:
    doc = doc_of(message(txa(f19=availability), "OBX|1|TX|R^R||text||||||F"))
    assert doc["status"] == status
    assert ("_status" in doc) is (availability != "AV")


def test_parent_document_relations_by_event() -> None:
    addendum = doc_of(message(txa(f12="DOC-2^DICT", f13="DOC-1^DICT"), event="T06"))
    replacement = doc_of(message(txa(f12="DOC-3^DICT", f13="DOC-1^DICT"), event="T10"))
    edit = doc_of(message(txa(f12="DOC-4^DICT", f13="DOC-1^DICT"), event="T08"))
    status_change = doc_of(message(txa(f12="DOC-2^DICT", f13="DOC-1^DICT"), event="T04"))
    target = {
        "type": "DocumentReference",
        "identifier": {"system": "urn:hl7bridge:authority:DICT", "value": "DOC-1"},
    }
    assert addendum["relatesTo"] == [{"code": "appends", "target": target}]
    assert replacement["relatesTo"] == [{"code": "replaces", "target": target}]
    assert edit["relatesTo"] == [{"code": "replaces", "target": target}]
    assert status_change["relatesTo"] == addendum["relatesTo"]
    assert status_change["id"] == addendum["id"]
    assert addendum["id"] != replacement["id"]


def test_people_dates_orders_and_labels() -> None:
    bundle, _ = run(
        message(
            txa(
                f5="D200^Surgeon^Sam",
                f10="D300^Signer^Sue",
                f14="ORD-1^PLACER~ORD-2^PLACER",
                f15="FIL-1^LAB",
                f16="/docs/2024/doc1.rtf",
                f18="V",
                f28="394609007^General surgery^SCT",
            ),
            "OBX|1|TX|R^R||text||||||F",
        )
    )
    [doc] = resources(bundle, "DocumentReference")
    practitioners = {p["id"]: p for p in resources(bundle, "Practitioner")}

    def person(ref: dict[str, str]) -> str:
        return str(practitioners[ref["reference"].removeprefix("urn:uuid:")]["name"][0]["family"])

    assert [person(a) for a in doc["author"]] == ["Author", "Surgeon"]
    assert person(doc["authenticator"]) == "Signer"
    assert doc["date"] == "2024-03-15T09:30:00+01:00"
    assert doc["context"]["period"] == {"start": "2024-03-15T09:00:00+01:00"}
    assert doc["identifier"] == [{"value": "/docs/2024/doc1.rtf"}]
    assert [r["identifier"]["value"] for r in doc["context"]["related"]] == [
        "ORD-1",
        "ORD-2",
        "FIL-1",
    ]
    assert doc["context"]["related"][2]["identifier"]["type"]["coding"][0]["code"] == "FILL"
    assert doc["context"]["practiceSetting"]["coding"][0] == {
        "system": "http://snomed.info/sct",
        "code": "394609007",
        "display": "General surgery",
    }
    assert doc["securityLabel"][0]["coding"] == [
        {
            "system": "http://terminology.hl7.org/CodeSystem/v2-0272",
            "code": "V",
            "display": "Very restricted",
        },
        {
            "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
            "code": "V",
            "display": "very restricted",
        },
    ]
    assert doc["subject"]["reference"].startswith("urn:uuid:")
    assert_references_resolve(bundle)


@pytest.mark.parametrize("version", ["2.3", "2.5.1", "2.8"])
def test_order_group_is_a_service_request_the_document_relates_to(version: str) -> None:
    """ORC/OBR (MDM order group) → ServiceRequest (IG MDM_T02 map, ORC/OBR maps);
    context.related references it; a TXA-14 number it carries is not repeated."""
    bundle, unmapped = run(
        message(
            "ORC|SC|PL-9^EHR|FI-9^LAB",
            "OBR|1|PL-9^EHR|FI-9^LAB|02585^Transthoracic echo^PCV4|||20240315080000+0100",
            "NTE|1||Fasting",
            txa(f14="PL-9^EHR", f15="OTHER-FILL^LAB"),
            "OBX|1|TX|R^R||text||||||F",
            version=version,
        )
    )
    [doc] = resources(bundle, "DocumentReference")
    [request] = resources(bundle, "ServiceRequest")
    assert [(i["type"]["coding"][0]["code"], i["value"]) for i in request["identifier"]] == [
        ("PLAC", "PL-9"),
        ("FILL", "FI-9"),
    ]
    assert request["code"]["coding"][0]["code"] == "02585"
    assert request["code"]["text"] == "Transthoracic echo"
    assert (request["status"], request["intent"]) == ("unknown", "order")
    assert request["note"] == [{"text": "Fasting"}]
    assert request["subject"] == doc["subject"]
    related = doc["context"]["related"]
    assert related[0] == {"reference": f"urn:uuid:{request['id']}"}
    assert [r["identifier"]["value"] for r in related[1:]] == ["OTHER-FILL"]
    assert not [u for u in unmapped if u.split("-")[0] in ("ORC", "OBR", "NTE")]
    assert not resources(bundle, "Observation")  # the document's OBX stay its content
    assert_references_resolve(bundle)


def test_authentication_person_stands_in_for_the_authenticator() -> None:
    bundle, _ = run(
        message(txa(f22="D400^Checker^Cy^^^^^^^^^^^^20240315120000+0100"), "OBX|1|TX|R^R||x|")
    )
    [doc] = resources(bundle, "DocumentReference")
    ref = doc["authenticator"]["reference"]
    [checker] = [p for p in resources(bundle, "Practitioner") if f"urn:uuid:{p['id']}" == ref]
    assert checker["identifier"][0]["value"] == "D400"


def test_times_without_offset_take_the_default_timezone() -> None:
    doc = doc_of(message(txa(f4="202403150900", f6="20240315093000"), "OBX|1|TX|R^R||x|"))
    assert doc["date"] == "2024-03-15T09:30:00+00:00"
    assert doc["context"]["period"] == {"start": "2024-03-15T09:00:00+00:00"}
    assert attachments(doc)[0]["creation"] == "2024-03-15T09:30:00+00:00"


def test_v23_plain_document_type_and_v28_coded_type() -> None:
    v23 = doc_of(message(txa(f2="HP"), "OBX|1|TX|R^R||x|", version="2.3"))
    assert v23["type"]["coding"] == [
        {
            "system": "http://terminology.hl7.org/CodeSystem/v2-0270",
            "code": "HP",
            "display": "History and physical examination",
        }
    ]
    v28 = doc_of(message(txa(f2="11506-3^Progress note^LN"), "OBX|1|TX|R^R||x|", version="2.8"))
    assert v28["type"]["coding"] == [
        {"system": "http://loinc.org", "code": "11506-3", "display": "Progress note"}
    ]


def test_encounter_from_the_context_goes_to_context_encounter() -> None:
    ctx = MappingContext(message(txa(), "OBX|1|TX|R^R||x|"), "evt-enc", MappingOptions())
    ctx.encounter_ref = ctx.add({"resourceType": "Encounter", "id": "enc-1", "status": "unknown"})
    map_mdm(ctx)
    [doc] = [
        e["resource"] for e in ctx.entries if e["resource"]["resourceType"] == "DocumentReference"
    ]
    assert doc["context"]["encounter"] == [{"reference": "urn:uuid:enc-1"}]


def test_without_txa_the_message_is_rejected() -> None:
    with pytest.raises(RequiredFieldMissing) as caught:
        run(message("OBX|1|TX|R^R||x|"))
    assert caught.value.location == "TXA"


def test_txa_and_obx_fields_read_are_not_reported_unmapped() -> None:
    _, unmapped = run(
        message(txa(f19="AV", f25="Title"), "OBX|1|TX|R^R|1|line||||||F", "NTE|1||note")
    )
    assert [u for u in unmapped if u.split("-")[0] in ("TXA", "OBX", "NTE")] == ["OBX-11"]


# --- corpus ---------------------------------------------------------------------------


def test_corpus_has_mdm_messages() -> None:
    assert len(MDM_FILES) == 13


def _family(path: Path) -> str:
    return parse_message(path.read_bytes()).header.message_code


@pytest.mark.parametrize("path", MDM_FILES, ids=lambda p: p.name)
def test_every_mdm_corpus_message_maps_and_validates(path: Path) -> None:
    msg = parse_message(path.read_bytes())
    bundle, unmapped = run(msg, f"{msg.header.sender_key}|{msg.header.control_id}")
    [doc] = resources(bundle, "DocumentReference")
    assert doc["content"]
    assert doc["status"] == "current"
    assert "TXA" not in unmapped and "OBX" not in unmapped
    header = bundle["entry"][0]["resource"]
    assert {"reference": f"urn:uuid:{doc['id']}"} in header["focus"]
    assert_references_resolve(bundle)


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_mdm_t02_01_agrees_with_microsoft() -> None:
    expected = expected_bundle("MDM-T02-01")
    [ms_doc] = resources(expected, "DocumentReference")
    [ms_report] = resources(expected, "DiagnosticReport")
    bundle, _ = run(parse_message((MS_SAMPLES / "MDM-T02-01.hl7").read_bytes()))
    [doc] = resources(bundle, "DocumentReference")

    assert doc["type"]["coding"][0]["code"] == ms_doc["type"]["coding"][0]["code"] == "DI"
    assert doc["status"] == ms_doc["status"] == "current"
    assert doc["masterIdentifier"]["value"] == ms_doc["masterIdentifier"]["value"]
    assert _instant(doc["context"]["period"]["start"]) == _instant(
        ms_doc["context"]["period"]["start"]
    )
    assert _instant(attachments(doc)[0]["creation"]) == _instant(
        ms_doc["content"][0]["attachment"]["creation"]
    )
    assert attachments(doc)[0]["contentType"] == ms_report["presentedForm"][0]["contentType"]
    # Deliberate difference: TXA-17 "AU" (authenticated) is a final document;
    # Microsoft's template says preliminary.
    assert ms_doc["docStatus"] == "preliminary"
    assert doc["docStatus"] == "final"
    author_ids = {
        p["identifier"][0]["value"]
        for p in resources(bundle, "Practitioner")
        if {"reference": f"urn:uuid:{p['id']}"} in doc["author"]
    }
    assert author_ids == {"IvanDoctorovich"}
