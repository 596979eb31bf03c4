"""The model versions a worker holds, and which one serves."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from pathlib import Path

from service.serving.runtime import LoadedModel, load_model

_KEEP_LOADED = 2  # the active version and the one before: switching back is instant


class ModelHolder:
    def __init__(self, model_dir: Path, initial: LoadedModel) -> None:
        self._model_dir = model_dir
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict({initial.version: initial})
        self.current = initial

    @classmethod
    def load(cls, model_dir: Path, version: str) -> ModelHolder:
        return cls(model_dir, load_model(model_dir, version))

    async def activate(self, version: str) -> LoadedModel:
        """Load `version` off the event loop if needed, then swap it in (one assignment)."""
        model = self._loaded.get(version)
        if model is None:
            model = await asyncio.to_thread(load_model, self._model_dir, version)
            self._loaded[version] = model
        self._loaded.move_to_end(version)
        while len(self._loaded) > _KEEP_LOADED:
            self._loaded.popitem(last=False)
        self.current = model
        return model
