"""The model versions a worker holds, and which one serves whom.

Every request asks for its tenant's version (its pin, else the platform's rollout share, else
the active version). Versions are loaded once per worker and kept, up to
`TENANTSERVE_MODEL_MAX_LOADED`, least recently used first out — never one that serves the
platform. A version that cannot be loaded is remembered and reported on `/ready`; its tenants
get 503 `not_ready`, never another version.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from functools import partial
from pathlib import Path

import structlog

from auth.principals import Customer
from service import metrics
from service.serving.registry import ModelError
from service.serving.runtime import LoadedModel, load_model
from service.single_flight import SingleFlight
from tenants.errors import NotReady
from tenants.rollout import PlatformVersions, version_for

log = structlog.get_logger("tenantserve.models")


class ModelHolder:
    def __init__(
        self, model_dir: Path, initial: LoadedModel, *, max_loaded: int, intra_op_threads: int
    ) -> None:
        self._model_dir = model_dir
        self._max_loaded = max(2, max_loaded)
        self._intra_op_threads = intra_op_threads
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict({initial.version: initial})
        self._loading: SingleFlight[str, LoadedModel] = SingleFlight()
        self.platform = PlatformVersions(active=initial.version)
        self.refused: dict[str, str] = {}
        """Versions that failed to load, with why: shown on `/ready`."""
        self.switching = asyncio.Lock()
        """Held while this worker changes what it serves to match the control row: by an admin's
        change from its write to its switch, by the change watcher from its read to its switch.
        So a read of the row from before an admin's commit is never applied after it."""
        metrics.model_served(initial.manifest.version, initial.manifest.algorithm)

    @classmethod
    def load(
        cls, model_dir: Path, version: str, *, max_loaded: int, intra_op_threads: int
    ) -> ModelHolder:
        try:
            model = load_model(model_dir, version, intra_op_threads=intra_op_threads)
            return cls(model_dir, model, max_loaded=max_loaded, intra_op_threads=intra_op_threads)
        except ModelError as exc:
            # One plain line before uvicorn's traceback: why this worker will not start.
            log.error("model_refused", model_version=version, error=str(exc))
            raise

    @property
    def current(self) -> LoadedModel:
        """The platform's active version (always loaded)."""
        return self._loaded[self.platform.active]

    def version_for(self, customer: Customer) -> str:
        return version_for(customer.tenant_id, customer.pinned_model_version, self.platform)

    async def for_customer(self, customer: Customer, version: str | None = None) -> LoadedModel:
        """The loaded model of `version` (default: the customer's own); 503 if it cannot load."""
        version = version or self.version_for(customer)
        model = self._loaded.get(version)
        if model is not None:
            return model
        try:
            return await self.preload(version)
        except (ModelError, OSError):
            raise NotReady(
                f"Model version {version!r} is not available; try again later."
            ) from None

    async def preload(self, version: str) -> LoadedModel:
        """Load `version` off the event loop (once, however many ask at the same time)."""
        model = self._loaded.get(version)
        if model is not None:
            self._loaded.move_to_end(version)
            return model
        return await self._loading.run(version, partial(self._load, version))

    async def _load(self, version: str) -> LoadedModel:
        try:
            model = await asyncio.to_thread(
                load_model, self._model_dir, version, intra_op_threads=self._intra_op_threads
            )
        except (ModelError, OSError) as exc:
            self.refused[version] = str(exc)
            log.error("model_refused", model_version=version, error=str(exc))
            raise
        self.refused.pop(version, None)
        self._loaded[version] = model
        self._evict()
        return model

    def _evict(self) -> None:
        keep = {self.platform.active, self.platform.rollout_version}
        for version in list(self._loaded):  # least recently used first
            if len(self._loaded) <= self._max_loaded:
                return
            if version not in keep:
                del self._loaded[version]

    async def set_platform(self, platform: PlatformVersions) -> LoadedModel:
        """Serve `platform`: its versions are loaded first, so no request waits or sees half."""
        model = await self.preload(platform.active)
        if platform.rollout_version is not None:
            await self.preload(platform.rollout_version)
        if platform != self.platform:
            self.platform = platform
            metrics.model_served(model.manifest.version, model.manifest.algorithm)
        return model
