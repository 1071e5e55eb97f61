"""Which metric names a PromQL expression reads, and which names a Prometheus exposition offers.

A deliberately small parser, enough for the queries of our dashboard and alert rules: string
literals, label matchers `{...}`, range/subquery selectors `[...]` and grouping clauses
(`by (...)`, `without (...)`, `on (...)`, `ignoring (...)`, `group_left (...)`,
`group_right (...)`) are removed; every identifier left that is not followed by `(` (a function
or aggregation), not a keyword and not a number is a series name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
_IDENTIFIER = re.compile(r"(?<![\w$.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(\s*\()?")
_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
    }
)
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}


def referenced_metrics(expr: str) -> set[str]:
    """Series names read by one PromQL expression (recording-rule names included, e.g. `a:b:c`)."""
    text = _STRING.sub(" ", expr)
    text = _GROUPING.sub(" ", text)
    for pattern in (_MATCHERS, _RANGES):
        previous = None
        while previous != text:  # nested subqueries/matchers
            previous, text = text, pattern.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        if re.fullmatch(r"[0-9.eE+-]+", name):
            continue
        names.add(name)
    return names


def exported_names(exposition: str) -> set[str]:
    """Every series name a Prometheus text exposition offers: sample names present, plus the
    names a declared family would export once it has a child (a labelled counter or histogram
    with no observation yet still declares itself with `# TYPE`)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(sample.name for sample in family.samples)
        suffixes = _SUFFIXES.get(family.type)
        if suffixes is None:
            names.add(family.name)
        else:
            names.update(f"{family.name}{suffix}" for suffix in suffixes)
    return names


def missing_metrics(exprs: Iterable[str], exported: set[str], recorded: set[str] = frozenset()) -> dict[str, set[str]]:
    """Expression -> names it reads that neither an endpoint exports nor a recording rule defines."""
    missing = {}
    for expr in exprs:
        unknown = referenced_metrics(expr) - exported - set(recorded)
        if unknown:
            missing[expr] = unknown
    return missing


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<query>.+?)\s*,\s*)?[a-zA-Z_][a-zA-Z0-9_]*\s*\)\s*$", re.DOTALL)


def grafana_variable_metrics(query: str) -> set[str]:
    """Series read by a Grafana Prometheus variable query: `label_values(metric_or_selector, label)`
    reads its first argument, `label_values(label)` none; anything else is plain PromQL."""
    match = _LABEL_VALUES.match(query)
    if match:
        return referenced_metrics(match.group("query")) if match.group("query") else set()
    return referenced_metrics(query)


_SELECTOR = re.compile(r"(?<![\w:])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^{}]*)\}")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def selector_labels(expr: str) -> dict[str, set[str]]:
    """Metric name -> label names its selectors match on (`m{a="x", b=~"y"}` -> {m: {a, b}})."""
    found: dict[str, set[str]] = {}
    blanked = _STRING.sub('""', expr)  # a label value may contain braces or `=`
    for name, matchers in _SELECTOR.findall(blanked):
        found.setdefault(name, set()).update(_MATCHER_LABEL.findall(matchers))
    return found
