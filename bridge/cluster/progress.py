"""The directory channel's progress store on ZooKeeper (fenced writes)."""

from __future__ import annotations

from adapters.directory.channel import FileProgress
from bridge.cluster.channels import ZkProgressStore


class DirectoryProgress:
    """:class:`adapters.directory.channel.ProgressStore` over a fenced znode store."""

    def __init__(self, store: ZkProgressStore) -> None:
        self._store = store

    async def load(self, file_key: str) -> FileProgress | None:
        value = await self._store.load_json(file_key)
        return None if value is None else FileProgress.from_json(value)

    async def save(self, file_key: str, progress: FileProgress) -> None:
        await self._store.save_json(file_key, progress.to_json())

    async def clear(self, file_key: str) -> None:
        await self._store.clear(file_key)
