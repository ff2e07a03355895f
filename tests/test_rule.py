"""Tests for exporter.core.rule: the etcd-defrag ``--defrag-rule`` parser and evaluator."""

from __future__ import annotations

import ast
import dataclasses
import math
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import exporter.core.rule
from exporter.core.rule import (
    MAX_NESTING_DEPTH,
    MAX_RULE_CHARS,
    VARIABLES,
    Rule,
    RuleEvaluationError,
    RuleSyntaxError,
    parse_rule,
)

MiB = 1024 * 1024
GiB = 1024 * MiB


def member(*, db_size: float, db_size_in_use: float, db_quota: float = 2 * GiB) -> dict[str, float]:
    """The five rule variables for one member, derived the way etcd-defrag derives them."""
    return {
        "dbSize": db_size,
        "dbSizeInUse": db_size_in_use,
        "dbSizeFree": db_size - db_size_in_use,
        "dbQuota": db_quota,
        # Go's float division yields +Inf for a zero quota; unused variables must not matter.
        "dbQuotaUsage": db_size / db_quota if db_quota else math.inf,
    }


def evaluate(source: str, **variables: float) -> bool:
    return parse_rule(source).evaluate(variables)


# --- rules etcd-defrag documents --------------------------------------------------------------

# ahrtr/etcd-defrag README.md, section "Defragmentation rule" (commit 6fbb111), verbatim.
README_RULES = [
    pytest.param(
        "dbSize > dbQuota*80/100 || dbSize - dbSizeInUse > 200*1024*1024",
        {"dbSize", "dbQuota", "dbSizeInUse"},
        id="readme-or",
    ),
    pytest.param(
        "dbQuotaUsage > 0.8 || dbSizeFree > 200*1024*1024",
        {"dbQuotaUsage", "dbSizeFree"},
        id="readme-or-derived-variables",
    ),
    pytest.param(
        "dbSize > dbQuota*80/100 && dbSize - dbSizeInUse > 200*1024*1024",
        {"dbSize", "dbQuota", "dbSizeInUse"},
        id="readme-and",
    ),
    # The mixed form quoted in our own docs.
    pytest.param(
        "dbQuotaUsage > 0.8 || dbSize - dbSizeInUse > 200*1024*1024",
        {"dbQuotaUsage", "dbSize", "dbSizeInUse"},
        id="mixed",
    ),
    # ahrtr/etcd-defrag internal/eval/evaluator_test.go, TestNew valid cases.
    pytest.param("dbSize > dbQuota*80/100", {"dbSize", "dbQuota"}, id="upstream-comparison"),
    pytest.param("dbSize - dbSizeInUse > 200*1024*1024", {"dbSize", "dbSizeInUse"}, id="upstream-arithmetic"),
    pytest.param(
        "(dbSize > dbQuota*80/100) || (dbSize - dbSizeInUse > 200*1024*1024)",
        {"dbSize", "dbQuota", "dbSizeInUse"},
        id="upstream-parentheses",
    ),
    pytest.param("dbQuotaUsage > 0.3", {"dbQuotaUsage"}, id="upstream-dbQuotaUsage"),
    pytest.param("dbSizeFree > 100", {"dbSizeFree"}, id="upstream-dbSizeFree"),
    pytest.param("dbSizeInUse / dbSize < 0.5", {"dbSizeInUse", "dbSize"}, id="upstream-ratio"),
]


@pytest.mark.parametrize(("source", "used"), README_RULES)
def test_documented_rules_parse_verbatim(source: str, used: set[str]) -> None:
    rule = parse_rule(source)
    assert str(rule) == source
    assert rule.source == source
    assert rule.variables_used() == frozenset(used)


OR_RULE = "dbSize > dbQuota*80/100 || dbSize - dbSizeInUse > 200*1024*1024"
AND_RULE = "dbSize > dbQuota*80/100 && dbSize - dbSizeInUse > 200*1024*1024"
DERIVED_OR_RULE = "dbQuotaUsage > 0.8 || dbSizeFree > 200*1024*1024"


@pytest.mark.parametrize(
    ("source", "values", "expected"),
    [
        # Default quota 2 GiB: 80 % is 1.6 GiB.
        (OR_RULE, member(db_size=1.7 * GiB, db_size_in_use=1.7 * GiB), True),
        (OR_RULE, member(db_size=1 * GiB, db_size_in_use=900 * MiB), False),
        (OR_RULE, member(db_size=1 * GiB, db_size_in_use=700 * MiB), True),
        (OR_RULE, member(db_size=1.6 * GiB, db_size_in_use=1.6 * GiB), False),  # exactly 80 %
        (OR_RULE, member(db_size=1 * GiB, db_size_in_use=824 * MiB), False),  # exactly 200 MiB free
        (OR_RULE, member(db_size=1 * GiB, db_size_in_use=824 * MiB - 1), True),
        (OR_RULE, member(db_size=0, db_size_in_use=0), False),
        (AND_RULE, member(db_size=1.7 * GiB, db_size_in_use=1.7 * GiB), False),
        (AND_RULE, member(db_size=1.7 * GiB, db_size_in_use=1 * GiB), True),
        (AND_RULE, member(db_size=1 * GiB, db_size_in_use=100 * MiB), False),
        (DERIVED_OR_RULE, member(db_size=1.7 * GiB, db_size_in_use=1.7 * GiB), True),
        (DERIVED_OR_RULE, member(db_size=1 * GiB, db_size_in_use=900 * MiB), False),
        (DERIVED_OR_RULE, member(db_size=1 * GiB, db_size_in_use=700 * MiB), True),
        (DERIVED_OR_RULE, member(db_size=8 * GiB, db_size_in_use=8 * GiB, db_quota=8 * GiB), True),
    ],
)
def test_readme_rules_against_members(source: str, values: dict[str, float], expected: bool) -> None:
    assert parse_rule(source).evaluate(values) is expected


# ahrtr/etcd-defrag internal/eval/evaluator_test.go, TestEvaluate, ported case by case
# (name, rule, dbQuota, dbSize, dbSizeInUse, expected).
UPSTREAM_EVALUATE_CASES = [
    ("empty rule", "", 100, 0, 0, True),
    ("dbSize is greater than dbQuota*80/100", "dbSize > dbQuota*80/100", 100, 81, 0, True),
    ("dbQuotaUsage is greater than 0.8", "dbQuotaUsage > 0.8", 100, 81, 0, True),
    ("dbSize is less than dbQuota*80/100", "dbSize > dbQuota*80/100", 100, 79, 0, False),
    ("dbQuotaUsage is less than 0.8", "dbQuotaUsage > 0.8", 100, 79, 0, False),
    ("free space is greater than 200", "dbSize - dbSizeInUse > 200", 0, 301, 100, True),
    ("dbSizeFree is greater than 200", "dbSizeFree > 200", 0, 301, 100, True),
    ("free space is less than 200", "dbSize - dbSizeInUse > 200", 0, 299, 100, False),
    ("dbSizeFree is less than 200", "dbSizeFree > 200", 0, 299, 100, False),
    ("AND both true", "dbSize > dbQuota*80/100 && dbSize - dbSizeInUse > 200", 1000, 801, 600, True),
    ("AND free too small", "dbSize > dbQuota*80/100 && dbSize - dbSizeInUse > 200", 100, 81, 60, False),
    ("OR both true", "dbSize > dbQuota*80/100 || dbSize - dbSizeInUse > 200", 1000, 801, 600, True),
    ("OR one true", "dbSize > dbQuota*80/100 || dbSize - dbSizeInUse > 200", 100, 81, 60, True),
    ("usage AND free", "dbQuotaUsage > 0.8 && dbSizeFree > 200", 1000, 801, 600, True),
    ("usage OR free", "dbQuotaUsage > 0.8 || dbSizeFree > 200", 100, 81, 60, True),
    ("result shouldn't round to 0", "dbSizeInUse / dbSize < 0.5", 0, 81, 60, False),
]


@pytest.mark.parametrize(
    ("source", "quota", "size", "in_use", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in UPSTREAM_EVALUATE_CASES],
)
def test_upstream_evaluate_table(source: str, quota: int, size: int, in_use: int, expected: bool) -> None:
    values = member(db_size=size, db_size_in_use=in_use, db_quota=quota)
    assert parse_rule(source).evaluate(values) is expected


# --- precedence, operators, float semantics ---------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        # Arithmetic binds tighter than comparison, * / % tighter than + -, all left-associative.
        ("1 + 2 * 3 == 7", True),
        ("(1 + 2) * 3 == 9", True),
        ("12 - 7 - 5 == 0", True),  # goval README example
        ("8 / 4 / 2 == 1", True),
        ("2 * 3 % 4 == 2", True),
        ("2 + 3 > 4 + 0", True),
        ("-2 * 3 == -6", True),
        ("-(4 + 3) == -7", True),  # goval README example
        ("5 + -4 == 1", True),  # goval README example
        ("-5 - -4 == -1", True),  # goval README example
        ("- -3 == 3", True),
        # && binds tighter than ||.
        ("true || false && false", True),  # goval README example
        ("false && false || true", True),  # goval README example
        ("(true || false) && false", False),
        # ! binds tighter than && and ==.
        ("!false && false", False),
        ("!(false && false)", True),
        ("!true == false", True),
        ("!!true", True),  # goval README example
        ("!false", True),
        # C precedence as in goval: == and != bind more loosely than < and >.
        ("1 < 2 == true", True),
        ("true == 1 < 2", True),
        ("1 > 2 != 3 > 4", False),
        ("1 < 2 == 3 < 4", True),
        # Comparisons; '<-' is '<' followed by unary minus, as in goval.
        ("3 <-4", False),  # goval README example
        ("-4 <= -1", True),  # goval README example
        ("3.5 >= 3.5", True),  # goval README example
        ("true", True),
        ("false", False),
        ("true != false", True),
        ("((((true))))", True),
        (" \t\n1 <\n 2\r\n", True),
    ],
)
def test_operators_and_precedence(source: str, expected: bool) -> None:
    assert evaluate(source) is expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        # goval (internal/parser.go.y): `expr '*' '*' expr` under `%left '*' '/' '%'`, unary minus
        # at the precedence of '!'. These are the shapes where its grouping is also the usual one.
        ("2 ** 30 == 1073741824", True),
        ("2 ** 3 * 2 == 16", True),  # (2 ** 3) * 2 both ways
        ("2 ** 3 / 4 == 2", True),
        ("1 + 2 ** 3 == 9", True),  # binds tighter than + and -
        ("2 ** 3 - 1 == 7", True),
        ("2 ** -1 == 0.5", True),  # a unary minus on the right is the exponent's
        ("2 ** - -1 == 2", True),
        ("(-2) ** 2 == 4", True),
        ("-(2 ** 2) == -4", True),
        ("(2 ** 3) ** 2 == 64", True),
        ("2 ** (3 ** 2) == 512", True),
        ("2 * (3 ** 2) == 18", True),
        ("(2 * 3) ** 2 == 36", True),
        ("4 ** 0.5 == 2", True),
        ("0 ** 0 == 1", True),  # math.Pow(0, 0) = 1, as Go's
        ("(-8) ** 3 == -512", True),
        ("2 ** 10 > 1000 && 2 ** 9 < 1000", True),
        ("2 ** 3 > 2 ** 2 == true", True),
    ],
)
def test_power_with_govals_precedence(source: str, expected: bool) -> None:
    assert evaluate(source) is expected


def test_power_of_variables_and_its_evaluation_errors() -> None:
    rule = parse_rule("dbSize > 2**30")  # the example, from etcd-defrag users
    assert rule.evaluate({"dbSize": 2**30}) is False
    assert rule.evaluate({"dbSize": 2**30 + 1}) is True
    rule = parse_rule("dbSizeFree ** 0.5 > 1024")
    assert rule.evaluate(member(db_size=2**21 + 1, db_size_in_use=1, db_quota=0)) is True
    assert rule.evaluate(member(db_size=2**20, db_size_in_use=0, db_quota=0)) is False
    with pytest.raises(RuleEvaluationError, match=r"no finite real result for \(-1\) \*\* \(0\.5\)"):
        rule.evaluate(member(db_size=0, db_size_in_use=1, db_quota=0))
    with pytest.raises(RuleEvaluationError, match=r"result of '\*\*' is too large"):
        parse_rule("dbSize ** 400 > 0").evaluate(member(db_size=10, db_size_in_use=0, db_quota=0))
    with pytest.raises(RuleEvaluationError, match="no finite real result"):
        parse_rule("dbSize ** -1 > 0").evaluate(member(db_size=0, db_size_in_use=0, db_quota=0))


def test_empty_rule_means_always_as_in_etcd_defrag() -> None:
    rule = parse_rule("")
    for values in (member(db_size=0, db_size_in_use=0, db_quota=0), {}):
        assert rule.evaluate(values) is True  # needs no variable, not even a quota
    assert rule.variables_used() == frozenset()
    assert str(rule) == '"" (empty: always)'
    assert rule.source == ""


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("24 / 10 == 2.4", True),  # float division (goval: integer 2, see module docstring)
        ("80 / 100 == 0.8", True),
        ("24.0 / 10 == 2.4", True),  # goval README example
        ("0.1 + 0.2 == 0.3", False),  # IEEE 754 doubles, exact ==
        ("0.1 + 0.2 > 0.3", True),
        ("7 % 3 == 1", True),
        ("-7 % 3 == -1", True),  # Go's math.Mod: sign of the left side (Python's % gives 2)
        ("7 % -3 == 1", True),
        ("5.5 % 2 == 1.5", True),  # goval README example
        ("10 % 3.5 == 3", True),  # goval README example
        ("1e6 == 1000000", True),
        ("1E-3 == 0.001", True),
        ("2.5e+2 == 250", True),
        (".5 == 0.5", True),
        ("5. == 5", True),
        ("0 == 0.0", True),
        ("0x10 == 16", True),
        ("0XfF == 255", True),
        ("200*1024*1024 == 209715200", True),
        ("1024*1024*1024*1024*1024*1024*1024 > 0", True),  # no int64 wrap-around
        ("-0 == 0", True),
    ],
)
def test_float_semantics(source: str, expected: bool) -> None:
    assert evaluate(source) is expected


@pytest.mark.parametrize(
    ("source", "db_size", "expected"),
    [
        ("dbSize / 3 > 0.33*dbSize", 100, True),
        ("dbSize / 3 > 0.34*dbSize", 100, False),
        ("dbSize / 3 * 3 == dbSize", 100, True),
        ("dbSize % 7 == 2", 100, True),
        ("dbSize / 1024 / 1024 >= 1.5", 1.5 * MiB, True),
    ],
)
def test_float_semantics_with_variables(source: str, db_size: float, expected: bool) -> None:
    assert evaluate(source, dbSize=db_size) is expected


@pytest.mark.parametrize(
    ("operator", "below", "equal", "above"),
    [
        (">", False, False, True),
        (">=", False, True, True),
        ("<", True, False, False),
        ("<=", True, True, False),
        ("==", False, True, False),
        ("!=", True, False, True),
    ],
)
def test_comparisons_at_the_boundary(operator: str, below: bool, equal: bool, above: bool) -> None:
    rule = parse_rule(f"dbSizeFree {operator} 200*1024*1024")
    assert rule.evaluate({"dbSizeFree": 200 * MiB - 1}) is below
    assert rule.evaluate({"dbSizeFree": 200 * MiB}) is equal
    assert rule.evaluate({"dbSizeFree": 200 * MiB + 1}) is above


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("!(dbSize > 100)", False),
        ("!(dbSize > 100) || dbQuota > 0", True),
        ("!(dbSize > 100 && dbQuota > 1000)", True),
        ("(dbSize > 100) == (dbQuota > 100)", False),
        ("(dbSize > 100) != (dbQuota > 100)", True),
        ("((dbSize - dbQuota)) * (2) < 0", False),
    ],
)
def test_not_and_parentheses(source: str, expected: bool) -> None:
    assert evaluate(source, dbSize=150, dbQuota=50) is expected


def test_short_circuit_lets_rules_guard_a_division() -> None:
    # Go semantics; goval evaluates both sides, which only differs where it would fail.
    assert evaluate("dbQuota > 0 && dbSize / dbQuota > 0.8", dbSize=1, dbQuota=0) is False
    assert evaluate("dbQuota == 0 || dbSize / dbQuota > 0.8", dbSize=1, dbQuota=0) is True


# --- malformed rules --------------------------------------------------------------------------


def _deep_parentheses(levels: int) -> str:
    return "(" * levels + "dbSize > 1" + ")" * levels


def _or_chain(terms: int) -> str:
    return " || ".join(["true"] * terms)


MALFORMED = [
    # (id, source, position, message fragment)
    ("blank", "  \t ", 0, 'rule is empty but for spaces; the empty rule "" means always defragment'),
    ("spaced power", "dbSize > 2 * * 30", 13, "expected an operand, got '*' (power is '**'"),
    ("power after *", "dbSize > 2 * 3 ** 2", 15, "'**' after '*' needs parentheses: etcd-defrag computes"),
    ("power after /", "dbSize / 2 ** 2 > 1", 11, "'**' after '/' needs parentheses"),
    ("power after %", "dbSize % 2 ** 2 > 1", 11, "'**' after '%' needs parentheses"),
    ("chained power", "dbSize > 2 ** 3 ** 2", 16, "'**' after '**' needs parentheses: etcd-defrag computes"),
    ("power of a negation", "-2 ** 2 < dbSize", 3, "'**' after a unary '-' needs parentheses"),
    ("power of a negated group", "-(2) ** 2 < dbSize", 5, "'**' after a unary '-'"),
    ("power without a real result", "(-8) ** 0.5 < dbSize", 5, "no finite real result for (-8) ** (0.5)"),
    ("power too large", "dbSize > 10 ** 400", 12, "result of '**' is too large"),
    ("power of a condition", "true ** 2 > 1", 0, "'**' needs a number on each side"),
    ("unclosed paren", "(dbSize > 1", 11, "expected ')' to close the '(' at column 1, got end of rule"),
    ("unclosed nested paren", "((dbSize > 1)", 13, "expected ')' to close the '(' at column 1"),
    ("unmatched close paren", "dbSize > 1)", 10, "unmatched ')'"),
    ("empty parens", "()", 1, "expected an operand, got ')'"),
    ("trailing comparison", "dbSize >", 8, "expected an operand, got end of rule"),
    ("trailing and", "dbSize > 1 &&", 13, "expected an operand, got end of rule"),
    ("doubled operator", "dbQuotaUsage > > 0.8", 15, "expected an operand, got '>'"),
    ("leading operator", "&& dbSize > 1", 0, "expected an operand, got '&&'"),
    ("unary plus", "+dbSize > 1", 0, "expected an operand, got '+'"),
    ("missing operator", "dbSize > 1 dbQuota", 11, "expected an operator or the end of the rule"),
    ("lowercase variable", "dbsize > 1", 0, "unknown variable 'dbsize' (did you mean 'dbSize'?)"),
    ("upstream invalid variable", "dbSizE > 100", 0, "did you mean 'dbSize'?"),
    ("typo variable", "dbQuotaUsge > 0.8", 0, "did you mean 'dbQuotaUsage'?"),
    ("unrelated name", "size > 1", 0, "valid variables are dbSize, dbSizeInUse, dbSizeFree, dbQuota"),
    ("capitalised boolean", "True", 0, "did you mean 'true'?"),
    ("nil", "nil == nil", 0, "unknown variable 'nil'"),
    ("python and", "dbSize > 1 and dbQuota > 2", 11, "use '&&' instead of 'and'"),
    ("python or in parens", "(dbSize > 1 or dbQuota > 2)", 12, "use '||' instead of 'or'"),
    ("python not", "not dbSize > 1", 0, "use '!' instead"),
    ("triple ampersand", "dbSize > 1 &&& dbSize < 2", 13, "'&' is not supported; did you mean '&&'?"),
    ("single ampersand", "dbSize & 1 > 0", 7, "did you mean '&&'?"),
    ("single pipe", "dbSize > 1 | dbQuota > 1", 11, "did you mean '||'?"),
    ("single equals", "dbSize = 1", 7, "'=' is not a comparison; use '=='"),
    ("arrow", "dbSize => 1", 7, "did you mean '>='?"),
    ("number only", "42", 0, "rule must be a condition (true/false), got a number"),
    (
        "upstream not boolean",
        "dbSize - dbSizeInUse",
        0,
        "rule must be a condition (true/false), got a number",
    ),
    ("parenthesised number", "  (dbSize + 1)", 2, "rule must be a condition"),
    ("string literal", 'dbSize > "x"', 9, "strings are not supported"),
    ("single-quoted string", "dbSize > 'x'", 9, "strings are not supported"),
    ("unknown character", "dbSize > 1 @", 11, "unexpected character '@'"),
    ("non-breaking space", "dbSize\u00a0> 1", 6, "(U+00A0)"),
    ("fullwidth greater-than", "dbSize \uff1e 1", 7, "(U+FF1E)"),
    ("nul byte", "dbSize >\x00 1", 8, "unexpected character '\\x00'"),
    ("brackets", "dbSize[0] > 1", 6, "unexpected character '['"),
    (
        "and on numbers",
        "dbSize && dbQuota",
        0,
        "'&&' needs a condition (true/false) on each side, but its left",
    ),
    ("or with a number", "dbSize > 1 || 2", 14, "but its right side is a number"),
    (
        "ordering on booleans",
        "true > 1",
        0,
        "'>' needs a number on each side, but its left side is a condition",
    ),
    ("arithmetic on conditions", "(dbSize > 1) + 1 > 0", 0, "'+' needs a number on each side"),
    ("bool equals number", "true == 1", 5, "'==' cannot compare a condition (true/false) with a number"),
    ("number not-equals bool", "dbSize != (dbQuota > 1)", 7, "'!=' cannot compare a number with a condition"),
    ("not on a number", "!dbSize > 1", 1, "write '!(a > b)', not '!a > b'"),
    ("minus on a condition", "-true", 1, "'-' needs a number, got a condition"),
    ("chained comparison", "1 < dbSize < 3", 11, "write 'a < b && b < c'"),
    ("octal-looking number", "dbSize > 010", 9, "leading zeros are not allowed"),
    ("digit separator", "dbSize > 1_000", 9, "invalid number '1_000'"),
    ("two dots", "dbSize > 1.5.3", 9, "invalid number '1.5.3'"),
    ("dangling exponent", "dbSize > 1e", 9, "invalid number '1e'"),
    ("binary literal", "dbSize > 0b101", 9, "invalid number '0b101'"),
    ("imaginary literal", "dbSize > 1i", 9, "invalid number '1i'"),
    ("huge literal", "dbSize > 1e400", 9, "number '1e400' is too large"),
    ("constant division by zero", "dbSize / 0 > 1", 7, "division by zero"),
    ("constant modulo by zero", "dbSize % (2 - 2) > 1", 7, "modulo by zero"),
    ("constant overflow", "1e308 * 10 > dbSize", 6, "result of '*' is too large"),
    ("double minus", "1 + --1 > 0", 4, "'--' is not an operator"),  # goval README: syntax error
    ("increment", "dbSize++ > 1", 6, "'++' is not an operator"),
    ("comment", "dbSize > 1 // defrag", 11, "comments are not supported"),
    ("block comment", "dbSize > 1 /* x */", 11, "comments are not supported"),
    ("shift", "dbSize << 2 > 1", 7, "bit shifts are not supported"),
    ("xor", "dbSize ^ 2 > 1", 7, "bit operators are not supported"),
    ("ternary", "dbSize > 1 ? true : false", 11, "conditional expressions"),
    ("function call", "max(dbSize, 1) > 2", 0, "unknown function 'max'"),
    ("python code", "__import__('os').system('x')", 0, "unknown function '__import__'"),
    ("python lambda", "(lambda: 1)() == 1", 1, "unknown variable 'lambda'"),
    ("too long", "dbSize > 1" + " " * MAX_RULE_CHARS, MAX_RULE_CHARS, "rule is too long: 4106 characters"),
    (
        "nested too deeply",
        _deep_parentheses(MAX_NESTING_DEPTH + 1),
        MAX_NESTING_DEPTH,
        "nested too deeply: more than 64 levels",
    ),
    ("unary chain", "!" * (MAX_NESTING_DEPTH + 1) + "true", MAX_NESTING_DEPTH, "nested too deeply"),
    (
        "long operator chain",
        _or_chain(MAX_NESTING_DEPTH + 2),
        8 * MAX_NESTING_DEPTH + 5,  # the 65th '||'
        "too complex: more than 64 nested operations",
    ),
    (
        "long chain near the length limit",
        " + ".join(["1"] * 1000) + " > 0",
        4 * MAX_NESTING_DEPTH + 2,
        "too complex",
    ),
]


@pytest.mark.parametrize(
    ("source", "position", "fragment"),
    [pytest.param(*case[1:], id=case[0]) for case in MALFORMED],
)
def test_malformed_rules_point_at_the_mistake(source: str, position: int, fragment: str) -> None:
    with pytest.raises(RuleSyntaxError) as caught:
        parse_rule(source)
    error = caught.value
    assert error.position == position, str(error)
    assert fragment in error.message
    assert error.source == source
    assert isinstance(error, ValueError)


def test_limits_are_inclusive() -> None:
    assert parse_rule(_deep_parentheses(MAX_NESTING_DEPTH)).evaluate({"dbSize": 2}) is True
    assert parse_rule("!" * MAX_NESTING_DEPTH + "true").evaluate({}) is True
    assert parse_rule(_or_chain(MAX_NESTING_DEPTH + 1)).evaluate({}) is True
    assert parse_rule("true" + " " * (MAX_RULE_CHARS - 4)).evaluate({}) is True


def test_pathological_input_is_rejected_without_recursion_error() -> None:
    for source in ("(" * 3000, "-" * 3000, "!" * 3000, "1" + "+1" * 2000 + ">0"):
        with pytest.raises(RuleSyntaxError):
            parse_rule(source)


def test_parse_rule_never_evaluates_python() -> None:
    with pytest.raises(RuleSyntaxError) as caught:
        parse_rule("__import__('os').system('touch /tmp/pwned')")
    assert caught.value.position == 0


def test_module_has_no_eval_compile_or_ast() -> None:
    tree = ast.parse(Path(exporter.core.rule.__file__).read_text())
    forbidden = {"eval", "exec", "compile", "__import__", "ast", "importlib"}
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not (names | imported) & forbidden


def test_only_strings_are_rules() -> None:
    with pytest.raises(TypeError, match="must be a string"):
        parse_rule(42)  # type: ignore[arg-type]


# --- error rendering --------------------------------------------------------------------------


def test_syntax_error_renders_column_and_caret() -> None:
    with pytest.raises(RuleSyntaxError) as caught:
        parse_rule("dbQuotaUsage > > 0.8")
    assert str(caught.value) == (
        "invalid defrag rule at column 16: expected an operand, got '>'\n"
        "  dbQuotaUsage > > 0.8\n"
        "                 ^"
    )


def test_syntax_error_in_a_multi_line_rule_shows_line_and_column() -> None:
    with pytest.raises(RuleSyntaxError) as caught:
        parse_rule("dbSize > 1 ||\n  dbQuota >")
    assert caught.value.position == 25
    assert str(caught.value) == (
        "invalid defrag rule at line 2, column 12: expected an operand, got end of rule\n"
        "    dbQuota >\n"
        "             ^"
    )


def test_caret_lines_up_after_tabs() -> None:
    with pytest.raises(RuleSyntaxError) as caught:
        parse_rule("\tdbSize\t>\t@")
    assert str(caught.value).splitlines()[1:] == ["  \tdbSize\t>\t@", "  \t      \t \t^"]


def test_long_line_is_excerpted_around_the_error() -> None:
    source = "dbSize > 1 || " * 20 + "dbSize > > 1"
    with pytest.raises(RuleSyntaxError) as caught:
        parse_rule(source)
    _, excerpt, caret = str(caught.value).splitlines()
    assert excerpt.startswith("  ...")
    assert len(excerpt) < 100
    assert excerpt[caret.index("^")] == ">"


def test_errors_survive_pickling() -> None:
    # Errors may cross process boundaries (e.g. a worker reporting a bad rule).
    with pytest.raises(RuleSyntaxError) as caught:
        parse_rule("dbSize >")
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (copy.message, copy.position, copy.source, str(copy)) == (
        caught.value.message,
        caught.value.position,
        caught.value.source,
        str(caught.value),
    )
    evaluation = RuleEvaluationError("division by zero", 7, "dbSize / dbQuota > 1")
    assert str(pickle.loads(pickle.dumps(evaluation))) == str(evaluation)


# --- evaluation errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "position", "fragment"),
    [
        ({"dbSize": 1, "dbQuota": 0}, 7, "division by zero"),
        ({"dbSize": 1e200, "dbQuota": 1e-200}, 7, "result of '/' is too large"),
        ({"dbSize": 1}, 9, "no value for variable 'dbQuota'"),
        ({"dbQuota": 1}, 0, "no value for variable 'dbSize'"),
        ({"dbSize": True, "dbQuota": 1}, 0, "variable 'dbSize' must be a number, got bool"),
        ({"dbSize": "1", "dbQuota": 1}, 0, "must be a number, got str"),
        ({"dbSize": None, "dbQuota": 1}, 0, "must be a number, got NoneType"),
        ({"dbSize": math.nan, "dbQuota": 1}, 0, "variable 'dbSize' is nan"),
        ({"dbSize": 1, "dbQuota": math.inf}, 9, "variable 'dbQuota' is inf"),
        ({"dbSize": 10**400, "dbQuota": 1}, 0, "only finite numbers"),
    ],
)
def test_evaluation_errors_are_raised_not_guessed(
    values: dict[str, object], position: int, fragment: str
) -> None:
    rule = parse_rule("dbSize / dbQuota > 0.8")
    with pytest.raises(RuleEvaluationError) as caught:
        rule.evaluate(values)  # type: ignore[arg-type]
    assert caught.value.position == position
    assert fragment in caught.value.message
    assert "cannot evaluate defrag rule at column" in str(caught.value)


def test_nan_cannot_turn_into_defragment() -> None:
    # With IEEE semantics NaN < 0.5 is false, so this rule would say "defragment".
    rule = parse_rule("!(dbQuotaUsage < 0.5)")
    with pytest.raises(RuleEvaluationError):
        rule.evaluate({"dbQuotaUsage": math.nan})


def test_multiplication_overflow_is_an_error() -> None:
    with pytest.raises(RuleEvaluationError, match=r"'\*' is too large"):
        evaluate("dbSize * dbQuota > 1", dbSize=1e200, dbQuota=1e200)


def test_unused_and_extra_variables_are_ignored() -> None:
    values = {"dbSize": 5, "dbQuotaUsage": math.nan, "somethingElse": "x"}
    assert parse_rule("dbSize > 1").evaluate(values) is True  # type: ignore[arg-type]


def test_evaluation_error_without_position_or_source() -> None:
    assert str(RuleEvaluationError("boom")) == "cannot evaluate defrag rule: boom"
    assert isinstance(RuleEvaluationError("boom"), ValueError)


# --- Rule value semantics ---------------------------------------------------------------------


def test_rule_is_an_immutable_hashable_value() -> None:
    first, second = parse_rule(OR_RULE), parse_rule(OR_RULE)
    assert first == second
    assert hash(first) == hash(second)
    assert len({first, second, parse_rule(AND_RULE)}) == 2
    assert repr(first) == f"Rule(source={OR_RULE!r})"
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.source = "true"  # type: ignore[misc]
    assert isinstance(first, Rule)


def test_variables_are_the_documented_five() -> None:
    assert VARIABLES == ("dbSize", "dbSizeInUse", "dbSizeFree", "dbQuota", "dbQuotaUsage")


def test_evaluate_returns_a_real_bool() -> None:
    result = parse_rule("dbSize > 1").evaluate({"dbSize": 2})
    assert type(result) is bool


# --- properties -------------------------------------------------------------------------------

RULE_ALPHABET = "dbSizeInUFrQuotaUsgeltf0123456789.xE ()!&|=<>+-*/%\t\n_@\"'"


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=80), st.text(alphabet=RULE_ALPHABET, max_size=80)))
def test_any_text_parses_or_raises_rule_syntax_error(source: str) -> None:
    outcome = _parse(source)
    if isinstance(outcome, RuleSyntaxError):
        assert 0 <= outcome.position <= len(source)
        assert str(outcome).startswith("invalid defrag rule at ")
    else:
        assert _evaluate(outcome, dict.fromkeys(VARIABLES, 3.0)) in (True, False, None)


def _parse(source: str) -> Rule | RuleSyntaxError:
    """The rule, or the syntax error it raised (and nothing else may escape)."""
    try:
        return parse_rule(source)
    except RuleSyntaxError as error:
        return error


def _evaluate(rule: Rule, values: dict[str, float]) -> bool | None:
    """The rule's verdict, or None for a RuleEvaluationError (and nothing else may escape)."""
    try:
        return rule.evaluate(values)
    except RuleEvaluationError:
        return None


# Well-typed random rules, each paired with a Python oracle that computes the same thing
# directly, so the tokenizer, parser and evaluator are checked against an independent path.
Oracle = Callable[[dict[str, float]], float]
BoolOracle = Callable[[dict[str, float]], bool]


class _Failed(Exception):
    pass


def _arithmetic(operator: str, a: float, b: float) -> float:
    if operator in "/%" and b == 0:
        raise _Failed
    result = {
        "+": lambda: a + b,
        "-": lambda: a - b,
        "*": lambda: a * b,
        "/": lambda: a / b,
        "%": lambda: math.fmod(a, b),
        "**": lambda: _pow(a, b),
    }[operator]()
    if not math.isfinite(result):
        raise _Failed
    return result


def _pow(a: float, b: float) -> float:
    try:
        return math.pow(a, b)
    except (OverflowError, ValueError):
        raise _Failed from None


def _number_leaf() -> st.SearchStrategy[tuple[str, Oracle]]:
    literals = [("0", 0.0), ("1", 1.0), ("2", 2.0), ("0.5", 0.5), ("1e3", 1e3), ("0x10", 16.0)]
    literal = st.sampled_from(literals).map(lambda pair: (pair[0], lambda _v, value=pair[1]: value))
    variable = st.sampled_from(VARIABLES).map(lambda name: (name, lambda v, name=name: v[name]))
    return literal | variable


def _number_node(
    children: st.SearchStrategy[tuple[str, Oracle]],
) -> st.SearchStrategy[tuple[str, Oracle]]:
    def binary(parts: tuple[tuple[str, Oracle], str, tuple[str, Oracle]]) -> tuple[str, Oracle]:
        (left, left_fn), operator, (right, right_fn) = parts
        if operator == "**":  # `-x ** y` is refused (docs/rules.md): group a negated base
            left = f"({left})"
        return f"({left} {operator} {right})", lambda v: _arithmetic(operator, left_fn(v), right_fn(v))

    def negate(part: tuple[str, Oracle]) -> tuple[str, Oracle]:
        text, fn = part
        return f"-({text})", lambda v: -fn(v)

    return st.tuples(children, st.sampled_from(["+", "-", "*", "/", "%", "**"]), children).map(
        binary
    ) | children.map(negate)


NUMBERS = st.recursive(_number_leaf(), _number_node, max_leaves=8)

COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


def _comparison(parts: tuple[tuple[str, Oracle], str, tuple[str, Oracle]]) -> tuple[str, BoolOracle]:
    (left, left_fn), operator, (right, right_fn) = parts
    return f"{left} {operator} {right}", lambda v: COMPARE[operator](left_fn(v), right_fn(v))


def _condition_node(
    children: st.SearchStrategy[tuple[str, BoolOracle]],
) -> st.SearchStrategy[tuple[str, BoolOracle]]:
    def logical(parts: tuple[tuple[str, BoolOracle], str, tuple[str, BoolOracle]]) -> tuple[str, BoolOracle]:
        (left, left_fn), operator, (right, right_fn) = parts
        if operator == "&&":
            return f"({left}) && ({right})", lambda v: left_fn(v) and right_fn(v)
        if operator == "||":
            return f"({left}) || ({right})", lambda v: left_fn(v) or right_fn(v)
        return f"({left}) {operator} ({right})", lambda v: COMPARE[operator](left_fn(v), right_fn(v))

    def negate(part: tuple[str, BoolOracle]) -> tuple[str, BoolOracle]:
        text, fn = part
        return f"!({text})", lambda v: not fn(v)

    return st.tuples(children, st.sampled_from(["&&", "||", "==", "!="]), children).map(
        logical
    ) | children.map(negate)


CONDITIONS = st.recursive(
    st.tuples(NUMBERS, st.sampled_from(sorted(COMPARE)), NUMBERS).map(_comparison)
    | st.sampled_from([("true", lambda _v: True), ("false", lambda _v: False)]),
    _condition_node,
    max_leaves=6,
)
SIZES = st.floats(min_value=-1e15, max_value=1e15, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(CONDITIONS, st.fixed_dictionaries({name: SIZES for name in VARIABLES}))
def test_generated_rules_match_an_independent_oracle(
    rule_and_oracle: tuple[str, BoolOracle], values: dict[str, float]
) -> None:
    source, oracle = rule_and_oracle
    try:
        expected: bool | None = oracle(values)
    except _Failed:
        expected = None
    outcome = _parse(source)
    if isinstance(outcome, RuleSyntaxError):
        # Only constant sub-expressions that cannot be computed are rejected up front.
        assert any(
            reason in outcome.message for reason in ("by zero", "too large", "no finite real result")
        ), str(outcome)
    else:
        assert _evaluate(outcome, values) == expected, source
