"""What the HTTP layer shares, kept in ``app.state.server``: settings, keys, metrics, the serving
layer once the model is loaded, and the server's phase."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from berth.server.auth import KeyStore
from berth.server.metrics import ServerMetrics
from berth.server.serving import Serving
from berth.server.settings import ServerSettings


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass
class ServerState:
    """What the routes share: settings, keys, metrics, the serving layer once loaded, the phase."""

    settings: ServerSettings
    keys: KeyStore
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    serving: Serving | None = None
    phase: Phase = Phase.LOADING
    in_flight: int = 0
    load_error: str | None = None

    def set_phase(self, phase: Phase) -> None:
        self.phase = phase
        self.metrics.ready.set(1 if phase is Phase.READY else 0)
        self.metrics.draining.set(1 if phase is Phase.DRAINING else 0)
