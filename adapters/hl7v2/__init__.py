"""HL7 v2 ER7 reading and acknowledgement building."""
