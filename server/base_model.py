"""The served base model's identity, computed once (hashing ~100 MB+ of weights) off the loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

from adapters.errors import BaseModelInvalid
from adapters.validate import BaseModelInfo


class BaseModelCache:
    """Awaitable provider of `BaseModelInfo` for the lifecycle; the first call does the work."""

    def __init__(self, path: Path | str | None) -> None:
        self._path = Path(path) if path is not None else None
        self._info: BaseModelInfo | None = None
        self._lock = asyncio.Lock()

    async def __call__(self) -> BaseModelInfo:
        if self._info is not None:
            return self._info
        if self._path is None:
            raise BaseModelInvalid(
                "The gateway does not know the served base model: set "
                "LORAPLEX_REGISTRY__BASE_MODEL_DIR (or engine.model in local mode)."
            )
        async with self._lock:
            if self._info is None:
                self._info = await asyncio.to_thread(BaseModelInfo.from_dir, self._path)
        return self._info
