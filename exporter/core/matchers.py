"""Label matchers in Alertmanager's syntax and semantics (prometheus/alertmanager `pkg/labels`).

A missing label matches as the empty string; regexes are anchored at both ends. Pure. Used by the
settings (validating `alerts.matchers`, `webhook.acting_matchers`) and by routing.
"""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache


class MatchOp(StrEnum):
    """Alertmanager's four matcher operators."""

    EQUAL = "="
    NOT_EQUAL = "!="
    REGEX = "=~"
    NOT_REGEX = "!~"


class MatcherSyntaxError(ValueError):
    """A matcher string is not valid Alertmanager syntax; the message quotes it."""


@dataclass(frozen=True)
class Matcher:
    """One label matcher, e.g. `etcd_cluster="tenant-a"` or `job=~"kube-etcd|etcd"`."""

    name: str
    op: MatchOp
    value: str
    pattern: re.Pattern[str] | None = None  # the anchored regex for =~ and !~

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether the labels satisfy this matcher; a missing label counts as ""."""
        actual = labels.get(self.name, "")
        if self.op is MatchOp.EQUAL:
            return actual == self.value
        if self.op is MatchOp.NOT_EQUAL:
            return actual != self.value
        assert self.pattern is not None
        found = self.pattern.fullmatch(actual) is not None
        return found if self.op is MatchOp.REGEX else not found

    def __str__(self) -> str:
        escaped = self.value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'{self.name}{self.op.value}"{escaped}"'


# Alertmanager's classic matcher grammar (pkg/labels/parse.go): name, operator, value.
_MATCHER = re.compile(r"^\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(=~|!~|!=|=)\s*(.*?)\s*$", re.DOTALL)
_SYNTAX_HELP = 'expected name="value", name!="value", name=~"regex" or name!~"regex"'


@lru_cache(maxsize=4096)
def parse_matcher(text: str) -> Matcher:
    """A Matcher from Alertmanager syntax; MatcherSyntaxError says what is wrong."""
    found = _MATCHER.match(text)
    if found is None:
        raise MatcherSyntaxError(f"invalid matcher {text!r}: {_SYNTAX_HELP}")
    name, op_text, raw = found.groups()
    op = MatchOp(op_text)
    value = _unquote(text, raw)
    pattern = None
    if op in (MatchOp.REGEX, MatchOp.NOT_REGEX):
        try:
            pattern = re.compile(value)
        except re.error as exc:
            raise MatcherSyntaxError(f"invalid regular expression in matcher {text!r}: {exc}") from None
    return Matcher(name, op, value, pattern)


def _unquote(text: str, raw: str) -> str:
    """The value, bare or quoted; in quotes \\\\, \\" and \\n are escapes, others stay (as Alertmanager)."""
    if not raw.startswith('"'):
        if any(c in raw for c in '",{}') or any(c.isspace() for c in raw):
            raise MatcherSyntaxError(f"invalid matcher {text!r}: quote the value, {_SYNTAX_HELP}")
        return raw
    if len(raw) < 2 or not raw.endswith('"'):
        raise MatcherSyntaxError(f"invalid matcher {text!r}: the value's closing quote is missing")
    out: list[str] = []
    body = raw[1:-1]
    index = 0
    while index < len(body):
        char = body[index]
        if char == "\\" and index + 1 < len(body):
            following = body[index + 1]
            out.append({"\\": "\\", '"': '"', "n": "\n"}.get(following, "\\" + following))
            index += 2
            continue
        if char == '"':
            raise MatcherSyntaxError(f"invalid matcher {text!r}: unescaped quote inside the value")
        if char == "\\":  # a lone trailing backslash would have escaped the closing quote
            raise MatcherSyntaxError(f"invalid matcher {text!r}: the value's closing quote is missing")
        out.append(char)
        index += 1
    return "".join(out)


def parse_matchers(texts: Sequence[str]) -> tuple[Matcher, ...]:
    """Every matcher of a list (config validation has already rejected bad ones)."""
    return tuple(parse_matcher(text) for text in texts)


def matches_all(matchers: Sequence[Matcher], labels: Mapping[str, str]) -> bool:
    """True when every matcher matches (an empty list matches everything)."""
    return all(m.matches(labels) for m in matchers)
