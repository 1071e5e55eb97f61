"""A real Prometheus server (Debian package `prometheus`) on a loopback port for tests: the
product's `LocalPrometheus`, plus what only tests ask of it (the series names the targets export,
the names a query reads)."""

from __future__ import annotations

import re
from typing import Self

from prometheus_client.parser import text_string_to_metric_families

from fraud.monitoring.local_prometheus import INSTALL_HINT, PrometheusError, prometheus_binary
from fraud.monitoring.local_prometheus import LocalPrometheus as ProductPrometheus
from tests.conftest import require

__all__ = ["LocalPrometheus", "PrometheusError", "exposition_names", "names_read"]

#: metric type (Prometheus metadata API) -> series names a family exports once it has a child
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}


#: our series and recording-rule names (`fraud_...`, `fraud:...`) as they appear in a query
OUR_NAMES = re.compile(r"(?<![\w:-])fraud[_:][A-Za-z0-9_:]*")


def names_read(expr: str) -> set[str]:
    """Our series names in a query (the project's metrics all start with `fraud_`, its recording
    rules with `fraud:`); whether the query is valid PromQL is Prometheus's or promtool's call."""
    return set(OUR_NAMES.findall(expr))


def exposition_names(exposition: str) -> set[str]:
    """Series names a Prometheus text exposition offers, the way `LocalPrometheus.series_names`
    counts them: sample names, plus what a declared family exports once it has a child."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        names.update(f"{family.name}{suffix}" for suffix in SUFFIXES.get(family.type, ()))
    return names


class LocalPrometheus(ProductPrometheus):
    """The product's local Prometheus (`fraud.monitoring.local_prometheus`); a missing binary fails
    the run in CI (`require`), and the test-only view of what the targets export."""

    def start(self, timeout: float = 120.0) -> Self:
        require(prometheus_binary(), f"prometheus ({INSTALL_HINT})")
        return super().start(timeout)

    def series_names(self) -> set[str]:
        """Every series name the targets export: names with samples, plus those a declared family
        (metadata from `# TYPE`) exports once it has a child (a labelled counter with no child yet)."""
        names = set(self.api("label/__name__/values"))
        for family, entries in self.api("metadata").items():
            names.add(family)
            for entry in entries:
                names.update(f"{family}{suffix}" for suffix in SUFFIXES.get(entry["type"], ()))
        return names
