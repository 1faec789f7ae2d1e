"""ServerState: what every handler reaches through ``request.app["srv"]``."""

from __future__ import annotations

from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess

from sglang_pd.server.metrics import ServerMetrics
from sglang_pd.server.tokenizer_manager import TokenizerManager
from sglang_pd.server_args import ServerArgs


@dataclass
class ServerState:
    args: ServerArgs
    tm: TokenizerManager
    metrics: ServerMetrics
    children: dict[str, BaseProcess] = field(default_factory=dict)
    version: str = "0.1.0"
    child_died: str | None = None  # set once by launch_server's watcher: which child died, with its exit code

    def dead_children(self) -> list[str]:
        return [name for name, p in self.children.items() if not p.is_alive()]

    def health_problem(self) -> str | None:
        """None when healthy; else why /health answers 503."""
        if self.tm.ready is None:
            return "starting"
        if self.tm.draining:
            return "draining"
        dead = self.dead_children()
        if dead:
            return f"child process died: {', '.join(dead)}"
        return None
