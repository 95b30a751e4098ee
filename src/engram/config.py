"""How an engine runs: durability, sizes, intervals. A plain value, importable without the
engine, so that a command can show its defaults without loading the database code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    durability: str = "sync"
    segment_bytes: int = 64 << 20
    fast_tier_bytes: int = 256 << 20
    half_life_s: float = 7 * 86400.0
    checkpoint_interval: float = 1.0
    checkpoint_ops: int = 50_000
    cache_mib: int = 64
    batch_interval: float = 0.01
