"""The model versions a worker holds, and which one serves."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from pathlib import Path

import structlog

from service import metrics
from service.serving.registry import ModelError
from service.serving.runtime import LoadedModel, load_model

log = structlog.get_logger("tenantserve.models")

_KEEP_LOADED = 2  # the active version and the one before: switching back is instant


class ModelHolder:
    def __init__(self, model_dir: Path, initial: LoadedModel) -> None:
        self._model_dir = model_dir
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict({initial.version: initial})
        self.current = initial
        metrics.model_served(initial.manifest.version, initial.manifest.algorithm)

    @classmethod
    def load(cls, model_dir: Path, version: str) -> ModelHolder:
        try:
            return cls(model_dir, load_model(model_dir, version))
        except ModelError as exc:
            # One plain line before uvicorn's traceback: why this worker will not start.
            log.error("model_refused", model_version=version, error=str(exc))
            raise

    async def preload(self, version: str) -> LoadedModel:
        """Load `version` off the event loop (if not yet), without serving it."""
        model = self._loaded.get(version)
        if model is None:
            model = await asyncio.to_thread(load_model, self._model_dir, version)
            self._loaded[version] = model
            for older in list(self._loaded)[:-1]:  # oldest first; never what serves now
                if len(self._loaded) > _KEEP_LOADED and older != self.current.version:
                    del self._loaded[older]
        return model

    async def activate(self, version: str) -> LoadedModel:
        """Load `version` if needed, then swap it in (one assignment: no request sees half)."""
        model = await self.preload(version)
        self._loaded.move_to_end(version)
        self.current = model
        metrics.model_served(model.manifest.version, model.manifest.algorithm)
        return model
