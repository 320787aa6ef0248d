"""What the engine counts about itself, for the gateway's /metrics and the benchmarks."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_preempted_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    tokens_last_step: int
    spec_draft_tokens: int = 0  # drafts verified so far
    spec_accepted_tokens: int = 0
    spec_accepted_by_position: list[int] = field(default_factory=list)  # accepted at draft position i
    spec_verify_steps: int = 0  # request-steps that verified at least one draft
    spec_draft_seconds: float = 0.0  # time the runner spent proposing drafts (filled in by the engine)
    step_seconds: float = 0.0  # time the runner spent executing steps (filled in by the engine)

    @property
    def spec_acceptance_rate(self) -> float:
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else 0.0

    @property
    def spec_draft_time_share(self) -> float:
        return self.spec_draft_seconds / self.step_seconds if self.step_seconds else 0.0

    @property
    def spec_acceptance_by_position(self) -> list[float]:
        """Share of verifying request-steps whose draft i was accepted."""
        return [a / self.spec_verify_steps for a in self.spec_accepted_by_position] if self.spec_verify_steps else []

    @property
    def spec_mean_accepted_length(self) -> float:
        """Tokens emitted per verifying request-step: accepted drafts plus the one the target adds."""
        return 1 + self.spec_accepted_tokens / self.spec_verify_steps if self.spec_verify_steps else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


@dataclass
class SpecCounters:
    """Speculative decoding so far: drafts verified, accepted, and accepted at each draft position."""

    drafts: int = 0
    accepted: int = 0
    steps: int = 0
    accepted_by_position: list[int] = field(default_factory=list)

    def record(self, num_drafts: int, num_accepted: int) -> None:
        self.drafts += num_drafts
        self.accepted += num_accepted
        self.steps += 1
        if len(self.accepted_by_position) < num_drafts:
            self.accepted_by_position.extend([0] * (num_drafts - len(self.accepted_by_position)))
        for i in range(num_accepted):
            self.accepted_by_position[i] += 1
