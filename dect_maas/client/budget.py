"""Budget values: amounts of usage, the limits on them, and the one check that compares them.

Pure values and arithmetic; storage and locking live in ``_ledger``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from dect_maas._exceptions import BudgetExceeded, ConfigError

__all__ = ["LIMIT_NAMES", "BudgetLimits", "Usage", "check_limits"]

LIMIT_NAMES = ("queries", "requests", "input_tokens", "cost_usd")
"""The limited quantities, in the order they are checked and reported."""

# Money is summed in integer pico-dollars inside the ledger, so totals across many small
# requests and processes are exact; this is the conversion.
PICO_PER_USD = 10**12


@dataclass(frozen=True)
class Usage:
    """An amount of provider use: examples queried, HTTP requests, input tokens and money.

    A value, not an account: ``+`` and ``-`` work field by field, and a difference may be
    negative. The ledger refuses negative amounts where it records spending.
    """

    queries: int = 0
    requests: int = 0
    input_tokens: int = 0
    cost_usd: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(
            self.queries + other.queries,
            self.requests + other.requests,
            self.input_tokens + other.input_tokens,
            self.cost_usd + other.cost_usd,
        )

    def __sub__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(
            self.queries - other.queries,
            self.requests - other.requests,
            self.input_tokens - other.input_tokens,
            self.cost_usd - other.cost_usd,
        )

    def validate(self, what: str = "usage") -> None:
        """Raise ConfigError unless every amount is a non-negative (finite) number."""
        for name in ("queries", "requests", "input_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{what}.{name} must be a non-negative int, got {value!r}")
        cost = self.cost_usd
        if (
            isinstance(cost, bool)
            or not isinstance(cost, (int, float))
            or not math.isfinite(cost)
            or cost < 0
        ):
            raise ConfigError(f"{what}.cost_usd must be a non-negative number, got {cost!r}")

    def as_ints(self) -> tuple[int, int, int, int]:
        """``(queries, requests, input_tokens, cost in pico-dollars)``: the ledger's exact form."""
        return (
            self.queries,
            self.requests,
            self.input_tokens,
            round(self.cost_usd * PICO_PER_USD),
        )

    @classmethod
    def from_ints(cls, values: tuple[int, int, int, int]) -> Usage:
        queries, requests, input_tokens, cost_pico = values
        return cls(queries, requests, input_tokens, cost_pico / PICO_PER_USD)


@dataclass(frozen=True)
class BudgetLimits:
    """Ceilings on what the ledger folder may spend; None means no limit on that quantity.

    The limits apply to the whole ledger folder (every run that writes to it, in any process),
    so point runs that must share one budget at one folder.
    """

    max_queries: int | None = None
    max_requests: int | None = None
    max_input_tokens: int | None = None
    max_cost_usd: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            integral = f.name != "max_cost_usd"
            if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)):
                kind = "an int" if integral else "a number"
                raise ConfigError(f"BudgetLimits.{f.name} must be {kind} or None, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(
                    f"BudgetLimits.{f.name} must be non-negative and finite, got {value!r}"
                )

    def allowed(self, name: str) -> float | None:
        value: float | None = getattr(self, f"max_{name}")
        return value


def check_limits(
    limits: BudgetLimits,
    spent: tuple[int, int, int, int],
    reserved: tuple[int, int, int, int],
    asked: tuple[int, int, int, int],
) -> None:
    """Raise BudgetExceeded for the first limit that ``spent + reserved + asked`` would break.

    Arguments are integer vectors ``(queries, requests, input_tokens, cost in pico-dollars)``
    (see ``Usage.as_ints``), so money compares exactly and float rounding never refuses a
    request that fits to the cent.
    """
    for i, name in enumerate(LIMIT_NAMES):
        allowed = limits.allowed(name)
        if allowed is None:
            continue
        ceiling = round(allowed * PICO_PER_USD) if name == "cost_usd" else allowed
        if spent[i] + reserved[i] + asked[i] > ceiling:
            scale = PICO_PER_USD if name == "cost_usd" else 1
            raise BudgetExceeded(
                name,
                spent=spent[i] / scale,
                reserved=reserved[i] / scale,
                asked=asked[i] / scale,
                allowed=allowed,
            )
