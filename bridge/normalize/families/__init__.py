"""One module per HL7 v2 message family; each registers its mapper in
:data:`bridge.normalize.bundle.MAPPERS` when imported."""

from bridge.normalize.families import adt, mdm, orders, oru, siu, vxu

__all__ = ["adt", "mdm", "orders", "oru", "siu", "vxu"]
