"""The directory channel: HL7 v2 files dropped into a folder, published exactly once."""

from adapters.directory.channel import (
    DirectoryChannel,
    DirectorySettings,
    FileProgress,
    FileReport,
    MessageOutcome,
    ProgressStore,
    file_key,
)

__all__ = [
    "DirectoryChannel",
    "DirectorySettings",
    "FileProgress",
    "FileReport",
    "MessageOutcome",
    "ProgressStore",
    "file_key",
]
