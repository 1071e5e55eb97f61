"""The rollout policy: the traffic steps of a canary and every threshold its analysis applies.

One file per environment owns these numbers (`kustomize/overlays/<env>/rollout-policy.yaml`);
`fraud deploy --policy FILE` and the pipeline's deploy step read it, the analysis
(`fraud.deploy.canary`) applies it. Without a file the defaults below apply.

    apiVersion: fraud.platform/v1
    kind: RolloutPolicy
    steps:                        # canary share and analysis window of each step; the last < 100
      - {percent: 5, windowSeconds: 300}
      - {percent: 25, windowSeconds: 300}
      - {percent: 50, windowSeconds: 600}
    evaluationIntervalSeconds: 5  # how often the analysis looks during a window (early abort)
    checks: {...}                 # CanaryCriteria fields, camelCase
    abort: {...}                  # AbortRules fields, camelCase

Promotion (100 %) follows the last step that passes.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

API_VERSION = "fraud.platform/v1"
KIND = "RolloutPolicy"


class PolicyError(ValueError):
    """The rollout policy file is missing, unreadable or holds an invalid value (message names it)."""


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@dataclass(frozen=True)
class CanaryCriteria:
    """When a canary is good enough. Every check runs; any failure (or a value that cannot be
    computed) rolls back."""

    #: fewer successful scorings (HTTP 2xx) than this in the window: not enough evidence
    min_successful_scorings: int = 50
    #: canary server-error rate may not exceed max(stable rate + increase, max_error_rate)
    max_error_rate: float = 0.01
    max_error_rate_increase: float = 0.005
    #: canary client-error (4xx) rate may not exceed max(stable rate + increase, max_client_error_rate)
    max_client_error_rate: float = 0.02
    max_client_error_rate_increase: float = 0.01
    #: canary p99 latency may not exceed stable p99 * this factor, nor max_p99_seconds
    max_p99_ratio: float = 1.5
    max_p99_seconds: float = 0.25
    #: Kolmogorov-Smirnov distance between binned score distributions
    max_score_shift: float = 0.2
    #: decline / review / approve shares: a two-proportion z-test per class; a class fails when the
    #: difference is significant at decision_alpha AND larger than max_decision_share_difference
    decision_alpha: float = 0.001
    max_decision_share_difference: float = 0.05
    #: transactions each version must have scored before decision shares and reason mix are compared
    min_decision_count: int = 30
    #: total variation distance between the canary's and stable's reason-code shares
    max_reason_mix_distance: float = 0.3
    min_reason_count: int = 30
    #: canary share of transactions scored with missing or stale features, minus stable's
    max_missing_stale_increase: float = 0.05
    #: drift transformer windows flagged as drifted during the analysis window (where one serves)
    max_drifted_windows: int = 0

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PolicyError(f"checks.{_camel(item.name)} must be a number, got {value!r}")
            if not (math.isfinite(value) and value >= 0):
                raise PolicyError(f"checks.{_camel(item.name)} must be a finite number >= 0, got {value!r}")
        if not 0 < self.decision_alpha < 1:
            raise PolicyError(f"checks.decisionAlpha must be within (0, 1), got {self.decision_alpha}")


@dataclass(frozen=True)
class AbortRules:
    """When a window ends early with a roll back (checked at every evaluation)."""

    #: this many failed canary requests (5xx or 4xx) in a row between two looks, none successful
    consecutive_errors: int = 20
    #: a guardrail check exceeding its limit by this factor (with enough evidence) aborts at once
    wide_breach_factor: float = 3.0

    def __post_init__(self) -> None:
        if self.consecutive_errors < 1:
            raise PolicyError(f"abort.consecutiveErrors must be >= 1, got {self.consecutive_errors}")
        if not (math.isfinite(self.wide_breach_factor) and self.wide_breach_factor >= 1):
            raise PolicyError(f"abort.wideBreachFactor must be a finite number >= 1, got {self.wide_breach_factor}")


@dataclass(frozen=True)
class Step:
    percent: int
    window_seconds: int

    def __post_init__(self) -> None:
        if not 1 <= self.percent <= 99:
            raise PolicyError(f"steps[].percent must be within 1..99 (promotion is the 100 %), got {self.percent}")
        if self.window_seconds < 1:
            raise PolicyError(f"steps[].windowSeconds must be >= 1, got {self.window_seconds}")


@dataclass(frozen=True)
class RolloutPolicy:
    steps: tuple[Step, ...] = (Step(10, 600),)
    evaluation_interval_seconds: float = 5.0
    criteria: CanaryCriteria = field(default_factory=CanaryCriteria)
    abort: AbortRules = field(default_factory=AbortRules)

    def __post_init__(self) -> None:
        if not self.steps:
            raise PolicyError("steps must list at least one canary step")
        percents = [s.percent for s in self.steps]
        if percents != sorted(set(percents)):
            raise PolicyError(f"steps must have strictly increasing percents, got {percents}")
        if not (math.isfinite(self.evaluation_interval_seconds) and self.evaluation_interval_seconds > 0):
            raise PolicyError(
                f"evaluationIntervalSeconds must be a finite number > 0, got {self.evaluation_interval_seconds}"
            )

    @classmethod
    def single_step(cls, percent: int, window_seconds: int, **changes: Any) -> RolloutPolicy:
        return cls(steps=(Step(percent, window_seconds),), **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "steps": [{"percent": s.percent, "windowSeconds": s.window_seconds} for s in self.steps],
            "evaluationIntervalSeconds": self.evaluation_interval_seconds,
            "checks": {_camel(k): v for k, v in asdict(self.criteria).items()},
            "abort": {_camel(k): v for k, v in asdict(self.abort).items()},
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "rollout policy") -> RolloutPolicy:
        if not isinstance(data, dict):
            raise PolicyError(f"{source}: expected a mapping, got {type(data).__name__}")
        unknown = set(data) - {"apiVersion", "kind", "steps", "evaluationIntervalSeconds", "checks", "abort"}
        if unknown:
            raise PolicyError(f"{source}: unknown field(s) {', '.join(sorted(unknown))}")
        if data.get("kind", KIND) != KIND or data.get("apiVersion", API_VERSION) != API_VERSION:
            raise PolicyError(f"{source}: expected apiVersion {API_VERSION} kind {KIND}")
        try:
            steps = tuple(_section(Step, item, "steps[]") for item in data.get("steps") or ())
            return cls(
                steps=steps or cls().steps,
                evaluation_interval_seconds=float(data.get("evaluationIntervalSeconds", 5.0)),
                criteria=_section(CanaryCriteria, data.get("checks") or {}, "checks"),
                abort=_section(AbortRules, data.get("abort") or {}, "abort"),
            )
        except PolicyError as exc:
            raise PolicyError(f"{source}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise PolicyError(f"{source}: {exc}") from None


def _section(cls: Any, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise PolicyError(f"{where} must be a mapping, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = _snake(str(key))
        if name not in known:
            raise PolicyError(f"{where}.{key} is not a known field (known: {', '.join(_camel(k) for k in known)})")
        values[name] = value
    return cls(**values)


def load_policy(path: str | Path) -> RolloutPolicy:
    """The policy in `path` (YAML or JSON); PolicyError naming the file and the field otherwise."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PolicyError(f"cannot read rollout policy {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"rollout policy {path} is not valid YAML: {exc}") from None
    return RolloutPolicy.from_dict(data, str(path))


def parse_policy(text: str) -> RolloutPolicy:
    """A policy given as YAML/JSON text ("" = the defaults): the pipeline passes it as a parameter."""
    if not text.strip():
        return RolloutPolicy()
    try:
        return RolloutPolicy.from_dict(yaml.safe_load(text))
    except yaml.YAMLError as exc:
        raise PolicyError(f"rollout policy is not valid YAML: {exc}") from None
