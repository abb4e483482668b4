"""HL7 v2 → FHIR R4 normalization (DESIGN §6), following the HL7 v2-to-FHIR IG.

No I/O: :func:`normalize` takes a parsed message and returns the message Bundle
(plain dicts, validated in the tests with fhir.resources R4B) and the list of
what the mapping did not carry.
"""

from bridge.normalize.bundle import Normalized, normalize, to_fhir_bundle
from bridge.normalize.context import MappingOptions
from bridge.normalize.ids import patient_resource_id

__all__ = ["MappingOptions", "Normalized", "normalize", "patient_resource_id", "to_fhir_bundle"]
