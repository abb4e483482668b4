"""MLLP (Minimal Lower Layer Protocol) codec, server and client."""

from .client import MLLPClient
from .codec import (
    CARRIAGE_RETURN,
    DEFAULT_MAX_FRAME_BYTES,
    END_BLOCK,
    HEAD_BYTES,
    START_BLOCK,
    DecodedEvent,
    Frame,
    FrameTooLarge,
    GarbageSkipped,
    MLLPDecoder,
    encode_frame,
)
from .server import FrameHandler, MLLPServer, MLLPServerSettings, RejectReason

__all__ = [
    "CARRIAGE_RETURN",
    "DEFAULT_MAX_FRAME_BYTES",
    "END_BLOCK",
    "HEAD_BYTES",
    "START_BLOCK",
    "DecodedEvent",
    "Frame",
    "FrameHandler",
    "FrameTooLarge",
    "GarbageSkipped",
    "MLLPClient",
    "MLLPDecoder",
    "MLLPServer",
    "MLLPServerSettings",
    "RejectReason",
    "encode_frame",
]
