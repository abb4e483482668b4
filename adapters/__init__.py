"""Wire-protocol edges of hl7bridge: MLLP, HL7 v2 parsing and ACKs, FHIR REST."""
