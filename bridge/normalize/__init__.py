"""Normalization of incoming messages to FHIR R4 (DESIGN §6).

For now only the minimal HL7 v2 mapping (MessageHeader and Patient) exists; the
full HL7 v2-to-FHIR mapping is a later issue.
"""

from bridge.normalize.hl7v2_minimal import patient_resource_id, to_fhir_bundle, unmapped_segments

__all__ = ["patient_resource_id", "to_fhir_bundle", "unmapped_segments"]
