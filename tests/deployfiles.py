"""The team deployment's files (deploy/), read as their tools read them, for tests/test_deploy*.

No container engine runs here, so the compose file, the HAProxy and Prometheus configs and the
Grafana dashboard are parsed; the PromQL of the dashboard is taken apart far enough to name every
metric and label it uses.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
HAPROXY_FILE = DEPLOY / "haproxy.cfg"
PROMETHEUS_FILE = DEPLOY / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD_FILE = GRAFANA / "dashboards" / "vlmrun-cache.json"

#: The replicas of compose.yaml, and the port the image listens on (its base config file).
REPLICAS = ("cache-a", "cache-b")


def compose() -> dict[str, Any]:
    """compose.yaml as a mapping, YAML merge keys (``<<: *replica``) resolved."""
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def prometheus() -> dict[str, Any]:
    data = yaml.safe_load(PROMETHEUS_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def haproxy_sections(text: str | None = None) -> dict[str, list[str]]:
    """``"backend replicas"`` (and every other section) -> its directive lines, comments dropped
    and whitespace collapsed."""
    text = HAPROXY_FILE.read_text(encoding="utf-8") if text is None else text
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in text.splitlines():
        line = " ".join(raw.split("#", 1)[0].split())
        if not line:
            continue
        if not raw[0].isspace():
            current = sections.setdefault(line, [])
        else:
            assert current is not None, f"directive outside a section: {raw!r}"
            current.append(line)
    return sections


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every query of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


# --- PromQL, as far as naming metrics and labels goes ---------------------------------------

#: Keywords followed by a parenthesised list of label names.
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
OPERATOR_WORDS = frozenset({"and", "or", "unless", "bool", "offset"})

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*")
      | (?P<range>\[[^\]]*\])
      | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
      | (?P<number>[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)
      | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){},])
    )""",
    re.VERBOSE,
)


@dataclasses.dataclass(frozen=True)
class Selector:
    """One instant or range vector selector: a metric name and its label matchers."""

    metric: str
    #: label -> (operator, value), the value without its quotes.
    matchers: dict[str, tuple[str, str]]


@dataclasses.dataclass(frozen=True)
class Query:
    selectors: list[Selector]
    #: Labels named in by/without/on/ignoring/group_left/group_right lists.
    grouping: set[str]


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    expr = expr.rstrip()
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        assert match is not None and match.lastgroup, f"cannot read {expr[position:]!r} in {expr}"
        tokens.append((match.lastgroup, match.group(match.lastgroup)))
        position = match.end()
    return tokens


def parse(expr: str) -> Query:
    """The selectors and grouping labels of a PromQL expression (Grafana's ``$variables`` may
    stand in strings and ranges). Raises AssertionError on what it does not understand, so
    that a query it cannot read fails the test rather than passing unchecked."""
    tokens = _tokens(expr)
    selectors: list[Selector] = []
    grouping: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind != "name":
            assert text != "{", f"selector without a metric name in {expr}"
            i += 1
        elif text in GROUPING:
            assert following == "(", f"{text} without a label list in {expr}"
            end = next(j for j in range(i + 2, len(tokens)) if tokens[j][1] == ")")
            grouping.update(t for k, t in tokens[i + 2 : end] if k == "name")
            i = end + 1
        elif text in OPERATOR_WORDS or following in ("(", "by", "without"):
            i += 1  # a function, or an aggregation with its grouping after its name
        else:
            matchers: dict[str, tuple[str, str]] = {}
            i += 1
            if following == "{":
                end = next(j for j in range(i, len(tokens)) if tokens[j][1] == "}")
                body = [t for t in tokens[i + 1 : end] if t[1] != ","]
                assert len(body) % 3 == 0, f"label matchers of {text} in {expr}"
                for label, operator, value in zip(body[::3], body[1::3], body[2::3], strict=True):
                    assert label[0] == "name" and value[0] == "string", (text, expr)
                    matchers[label[1]] = (operator[1], json.loads(value[1]))
                i = end + 1
            selectors.append(Selector(text, matchers))
    return Query(selectors, grouping)
