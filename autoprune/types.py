"""Frozen records shared across modules.

These are the nouns that flow between the engine, the evaluators, the environment, the searchers and the
store. They are plain, immutable and JSON-friendly (``to_dict`` / ``from_dict``) so that trials can be stored
and candidates hashed for the evaluation cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any

from autoprune.errors import ConfigError

#: Cost metric name (as budgets, rewards and multi-objective searchers spell it) → the :class:`CostReport`
#: attribute holding its value. The one table of metric names: everything that reads a metric off a cost
#: report goes through :meth:`CostReport.metric`.
COST_METRICS: Mapping[str, str] = MappingProxyType({
    "macs": "macs",
    "params": "params",
    "size_bytes": "bytes",
    "bytes": "bytes",
    "latency_ms": "latency_ms",
    "latency": "latency_ms",
    "bitops": "bitops",
})


def _frozen_map(m: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(sorted((m or {}).items())))


@dataclass(frozen=True)
class QuantSpec:
    """Bit-widths of one layer.

    Attributes:
        w_bits: Weight bits (2–8), or ``None`` for float weights.
        a_bits: Bits of the layer's *input* activation (2–8), or ``None`` for float input.
    """

    w_bits: int | None = 8
    a_bits: int | None = None

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits"):
            b = getattr(self, name)
            if b is not None and (not isinstance(b, int) or isinstance(b, bool) or not 2 <= b <= 8):
                raise ValueError(f"{name} must be an integer in 2..8 or None, got {b!r}")

    def to_dict(self) -> dict[str, int | None]:
        """JSON-friendly form."""
        return {"w_bits": self.w_bits, "a_bits": self.a_bits}

    @classmethod
    def parse(cls, value: Any, layer: str) -> QuantSpec:
        """A spec from what users write for one layer's bits: a QuantSpec, an int / None (weight bits), a
        ``{"w_bits", "a_bits"}`` mapping or a ``(w_bits, a_bits)`` pair.

        Raises:
            ConfigError: Naming ``layer`` when the value is not one of those forms or the bits are illegal.
        """
        if isinstance(value, QuantSpec):
            return value
        try:
            if value is None or isinstance(value, int):
                return cls(value, None)
            if isinstance(value, Mapping):
                return cls(value.get("w_bits", 8), value.get("a_bits"))
            if isinstance(value, (tuple, list)) and len(value) == 2:
                return cls(value[0], value[1])
        except ValueError as exc:
            raise ConfigError(f"bits for layer {layer!r}: {exc}", hint="bit-widths are integers in 2..8 or None"
                              ) from exc
        raise ConfigError(f"bits for layer {layer!r} must be a QuantSpec, got {value!r}",
                          hint="use QuantSpec(w_bits=4, a_bits=8)")


@dataclass(frozen=True)
class Candidate:
    """One point of the search space: a width per channel group and (optionally) bits per layer.

    Attributes:
        widths: Channel-group id → kept channels. Groups not listed keep their full width.
        bits: Layer (module) name → :class:`QuantSpec`. Layers not listed stay float.
    """

    widths: Mapping[str, int] = field(default_factory=dict)
    bits: Mapping[str, QuantSpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", _frozen_map({k: int(v) for k, v in self.widths.items()}))
        object.__setattr__(self, "bits", _frozen_map(self.bits))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (round-trips through :meth:`from_dict`)."""
        return {"widths": dict(self.widths), "bits": {k: v.to_dict() for k, v in self.bits.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Candidate:
        """Inverse of :meth:`to_dict`."""
        bits = {k: QuantSpec(**v) for k, v in (d.get("bits") or {}).items()}
        return cls(widths=dict(d.get("widths") or {}), bits=bits)

    def key(self) -> str:
        """Stable hash of the candidate (used by the evaluation cache and to detect duplicates)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __hash__(self) -> int:
        return hash(self.key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Candidate) and self.to_dict() == other.to_dict()


@dataclass(frozen=True)
class CostReport:
    """Cost of a (possibly pruned and quantized) network.

    Attributes:
        macs: Multiply-accumulates of conv and linear layers for one input (batch 1).
        params: Number of parameters.
        bytes: Storage size in bytes (fp32 = 4 bytes per parameter unless quantized; exact packed size
            when bit-widths are given).
        bitops: Σ MACs·b_w·b_a (32 for float operands).
        payload_bits: Σ b·n over weights (HAQ's size metric, a lower bound of ``8 * bytes``).
        latency_ms: Measured median latency, when measured.
    """

    macs: int
    params: int
    bytes: int
    bitops: int = 0
    payload_bits: int = 0
    latency_ms: float | None = None

    @property
    def flops(self) -> int:
        """2 × MACs, the convention many papers call FLOPs."""
        return 2 * self.macs

    def metric(self, name: str) -> float | None:
        """The value of cost metric ``name`` (a key of :data:`COST_METRICS`, e.g. ``"size_bytes"``).

        Args:
            name: Metric name.

        Returns:
            The value as stored (an int for counts), or ``None`` when it was not measured (latency).

        Raises:
            ConfigError: If ``name`` is not a cost metric.
        """
        try:
            attr = COST_METRICS[name]
        except KeyError:
            raise ConfigError(f"unknown cost metric {name!r}", hint=f"choices: {', '.join(COST_METRICS)}") from None
        value: float | None = getattr(self, attr)
        return value

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)


@dataclass(frozen=True)
class EvalResult:
    """The score of one candidate by one evaluator.

    Attributes:
        accuracy: Top-1 accuracy in [0, 1] on the split the evaluator uses (validation during search).
        loss: Mean cross-entropy on that split.
        seconds: Wall-clock cost of the evaluation.
        samples: Training samples seen (forward passes on training data, incl. BN calibration).
        evaluator: Name of the evaluator.
        extra: Evaluator-specific data (e.g. InfCoP flow-distance trajectory and stop reason).
        score: The ranking signal in [0, 1] the evaluator was asked for (its ``score`` setting, e.g. the soft
            accuracy or the agreement with the dense model); None when it ranks by ``accuracy`` (the default).
    """

    accuracy: float
    loss: float
    seconds: float = 0.0
    samples: int = 0
    evaluator: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    score: float | None = None

    @property
    def ranking_score(self) -> float:
        """What rewards and searchers rank by: :attr:`score` when the evaluator computed one, else accuracy."""
        return float(self.accuracy if self.score is None else self.score)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        d = asdict(self)
        d["extra"] = dict(self.extra)
        return d


@dataclass(frozen=True)
class TrialRecord:
    """One evaluated candidate as stored in a campaign."""

    number: int
    candidate: Candidate
    cost: CostReport
    result: EvalResult | None
    reward: float | None
    searcher: str
    seed: int
    state: str = "complete"  # complete | failed | pruned
    reason: str = ""
