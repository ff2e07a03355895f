"""Parse and evaluate etcd-defrag's ``--defrag-rule`` expressions, without ``eval``.

A defrag rule is a condition over one member's sizes, for example (both from the
ahrtr/etcd-defrag README, section "Defragmentation rule")::

    dbSize > dbQuota*80/100 || dbSize - dbSizeInUse > 200*1024*1024
    dbQuotaUsage > 0.8 || dbSizeFree > 200*1024*1024

etcd-defrag hands the rule to github.com/maja42/goval (v1.6.0 in its go.mod), a general
expression language with strings, arrays, objects, functions and bit operators. We accept the
subset that is meaningful for numbers and conditions, with goval's operator precedence (which
follows C, so ``==``/``!=`` bind more loosely than ``<``/``>``), so every rule etcd-defrag
documents works here verbatim.

Grammar, lowest precedence first; binary operators are left-associative::

    rule     = "" | or ;                             (* must be a condition; "" means always *)
    or       = and { "||" and } ;
    and      = equality { "&&" equality } ;
    equality = relation { ( "==" | "!=" ) relation } ;
    relation = sum { ( "<" | "<=" | ">" | ">=" ) sum } ;
    sum      = product { ( "+" | "-" ) product } ;
    product  = unary { ( "*" | "/" | "%" | "**" ) unary } ;
    unary    = ( "!" | "-" ) unary | primary ;
    primary  = number | "true" | "false" | variable | "(" or ")" ;
    variable = "dbSize" | "dbSizeInUse" | "dbSizeFree" | "dbQuota" | "dbQuotaUsage" ;
    number   = ( digits [ "." [ digits ] ] | "." digits ) [ ( "e" | "E" ) [ "+" | "-" ] digits ]
             | ( "0x" | "0X" ) hexdigits ;    (* no leading zeros: goval reads 010 as octal *)

``**`` is power, exactly where goval puts it: its grammar has ``expr '*' '*' expr`` among the
``%left '*' '/' '%'`` rules and gives unary minus the precedence of ``!``, so ``**`` binds like ``*``,
associates to the left and binds more loosely than a unary minus. Where that reading differs from
the usual mathematical one, the rule is refused with a request for parentheses, so that no
accepted rule means one thing here (and in etcd-defrag) and another to its reader:

    a * b ** c   goval (a * b) ** c, maths a * (b ** c)   (also after / and %)
    a ** b ** c  goval (a ** b) ** c, maths a ** (b ** c)
    -a ** b      goval (-a) ** b,     maths -(a ** b)

``a ** b * c``, ``a + b ** c``, ``a ** -b`` and ``2 ** 30`` mean the same either way and are accepted.

Spaces, tabs and line breaks may separate tokens. Types are checked while parsing: arithmetic
and ``<``-style comparisons take numbers, ``&&``/``||``/``!`` take conditions, ``==``/``!=``
take two of the same kind, and the whole rule must be a condition.

Why parse rather than ``eval``: the rule comes from configuration, and Python's
``eval``/``compile`` would run whatever it is given (``__import__('os').system(...)``) and speak
a different language (``and``/``or``, Python's ``%`` sign rule). A hand-written tokenizer and
recursive-descent parser accept exactly the grammar above, report the column of the first
mistake, and produce an immutable AST that is checked once and evaluated many times.

Evaluation semantics:

* Every number is an IEEE 754 double: ``/`` is float division, ``%`` is Go's ``math.Mod``
  (the result takes the sign of the left side), ``**`` is ``math.Pow``, ``==`` is exact float
  equality.
* The empty rule ``""`` is always true, as etcd-defrag's ``Evaluate`` returns true for an empty
  rule without asking goval; a rule of only spaces is a syntax error there (goval) and here.
* ``&&`` and ``||`` short-circuit as in Go, so ``dbQuota > 0 && dbSize / dbQuota > 0.8`` is safe.
* Division or modulo by zero, a result too large for a double, and a missing, non-numeric or
  non-finite variable raise :class:`RuleEvaluationError`. We do not follow IEEE into inf/NaN:
  NaN compares false, so ``!(x < y)`` would silently turn bad input into "defragment".
  Callers must treat the error as "do not defragment" and report it. Sub-expressions made only
  of constants (``dbSize / 0``) are checked when the rule is parsed.
* Limits, so hostile input cannot exhaust the stack: at most 4096 characters, 64 levels of
  parentheses/unary operators, and 64 levels of nested operations.

Where this differs from etcd-defrag + goval: docs/rules.md lists every difference, in one place.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Final, NamedTuple

VARIABLES: Final[tuple[str, ...]] = (
    "dbSize",
    "dbSizeInUse",
    "dbSizeFree",
    "dbQuota",
    "dbQuotaUsage",
)

MAX_RULE_CHARS: Final = 4096
MAX_NESTING_DEPTH: Final = 64

_BOOLEAN_LITERALS: Final = {"true": True, "false": False}
# Words people type from other languages, mapped to the operator they meant.
_WORD_OPERATORS: Final = {"and": "&&", "or": "||", "not": "!"}

_ARITHMETIC: Final = frozenset({"+", "-", "*", "/", "%", "**"})
# What `a OP b ** c` may not follow unparenthesised: goval groups it as (a OP b) ** c.
_MULTIPLICATIVE: Final = frozenset({"*", "/", "%", "**"})
_ORDERING: Final = frozenset({"<", "<=", ">", ">="})
_EQUALITY: Final = frozenset({"==", "!="})
_LOGICAL: Final = frozenset({"&&", "||"})
# goval's yacc precedence (C rules), restricted to the operators we support; higher binds tighter.
_BINARY_PRECEDENCE: Final = {
    "||": 1,
    "&&": 2,
    "==": 3,
    "!=": 3,
    "<": 4,
    "<=": 4,
    ">": 4,
    ">=": 4,
    "+": 5,
    "-": 5,
    "*": 6,
    "/": 6,
    "%": 6,
    "**": 6,  # goval: `expr '*' '*' expr`, so the precedence (and left associativity) of '*'
}
# Longest first where one is a prefix of another ("**" before "*").
_OPERATORS: Final = ("&&", "||", "==", "!=", "<=", ">=", "<", ">", "+", "-", "**", "*", "/", "%", "!")
# Character sequences we recognise only to explain why they are not allowed.
_REJECTED_SEQUENCES: Final = (
    ("--", "'--' is not an operator; write '- -x' or '-(-x)' for a double negation"),
    ("++", "'++' is not an operator"),
    ("//", "comments are not supported in defrag rules"),
    ("/*", "comments are not supported in defrag rules"),
    ("<<", "bit shifts are not supported in defrag rules"),
    (">>", "bit shifts are not supported in defrag rules"),
    ("=>", "'=>' is not an operator; did you mean '>='?"),
    ("=<", "'=<' is not an operator; did you mean '<='?"),
    ("&", "'&' is not supported; did you mean '&&'?"),
    ("|", "'|' is not supported; did you mean '||'?"),
    ("=", "'=' is not a comparison; use '==' to test equality"),
    ('"', "strings are not supported in defrag rules"),
    ("'", "strings are not supported in defrag rules"),
    ("`", "strings are not supported in defrag rules"),
    ("^", "bit operators are not supported in defrag rules"),
    ("~", "bit operators are not supported in defrag rules"),
    ("?", "conditional expressions ('a ? b : c') are not supported in defrag rules"),
)
_WHITESPACE: Final = frozenset(" \t\r\n")
# ASCII only: str.isdigit() and \d would also accept other scripts' digits.
_NUMBER_RE: Final = re.compile(r"0[xX][0-9a-fA-F]+|(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER_TAIL_RE: Final = re.compile(r"[A-Za-z0-9_.]*")
_EXCERPT_CHARS: Final = 80


class RuleSyntaxError(ValueError):
    """A defrag rule that cannot be parsed or type-checked; points at the offending column."""

    message: str
    position: int  # 0-based offset into source; the rendered message shows it 1-based
    source: str

    def __init__(self, message: str, position: int, source: str) -> None:
        super().__init__(message, position, source)
        self.message = message
        self.position = position
        self.source = source

    def __str__(self) -> str:
        return _render_error("invalid defrag rule", self.message, self.position, self.source)


class RuleEvaluationError(ValueError):
    """A valid rule that could not be evaluated for the given values; never means "defragment"."""

    message: str
    position: int | None  # 0-based offset of the failing operation or variable, if known
    source: str

    def __init__(self, message: str, position: int | None = None, source: str = "") -> None:
        super().__init__(message, position, source)
        self.message = message
        self.position = position
        self.source = source

    def __str__(self) -> str:
        if self.position is None or not self.source:
            rule = f" {self.source!r}" if self.source else ""
            return f"cannot evaluate defrag rule{rule}: {self.message}"
        return _render_error("cannot evaluate defrag rule", self.message, self.position, self.source)


# --- AST --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Number:
    """A numeric literal."""

    value: float
    position: int


@dataclass(frozen=True, slots=True)
class Boolean:
    """The literal ``true`` or ``false``."""

    value: bool
    position: int


@dataclass(frozen=True, slots=True)
class Variable:
    """One of VARIABLES, read from the mapping given to Rule.evaluate."""

    name: str
    position: int


@dataclass(frozen=True, slots=True)
class Unary:
    """``!operand`` or ``-operand``; position is the operator's."""

    operator: str
    operand: Expression
    position: int


@dataclass(frozen=True, slots=True)
class Binary:
    """``left operator right``; position is the operator's."""

    operator: str
    left: Expression
    right: Expression
    position: int


Expression = Number | Boolean | Variable | Unary | Binary


class _Kind(Enum):
    NUMBER = "a number"
    CONDITION = "a condition (true/false)"


def _kind_of(node: Expression) -> _Kind:
    """The static type of an already type-checked node."""
    match node:
        case Boolean():
            return _Kind.CONDITION
        case Unary(operator="!"):
            return _Kind.CONDITION
        case Binary(operator=operator) if operator not in _ARITHMETIC:
            return _Kind.CONDITION
        case _:
            return _Kind.NUMBER


def _walk(node: Expression) -> Iterator[Expression]:
    """Every node of the tree, without recursion."""
    pending = [node]
    while pending:
        current = pending.pop()
        yield current
        match current:
            case Unary(operand=operand):
                pending.append(operand)
            case Binary(left=left, right=right):
                pending.extend((right, left))


@dataclass(frozen=True)
class Rule:
    """A parsed, type-checked defrag rule; build it with parse_rule()."""

    source: str
    expression: Expression = field(repr=False, compare=False)

    def __str__(self) -> str:
        return self.source or '"" (empty: always)'

    def variables_used(self) -> frozenset[str]:
        """Names of the variables the rule reads."""
        return frozenset(_first_uses(self.expression))

    def evaluate(self, variables: Mapping[str, float]) -> bool:
        """Whether the rule holds for these values; raises RuleEvaluationError rather than guess."""
        values: dict[str, float] = {}
        for name, position in sorted(_first_uses(self.expression).items(), key=lambda i: i[1]):
            values[name] = _checked_value(variables, name, position, self.source)
        try:
            return _eval_condition(self.expression, values)
        except _EvaluationFailure as failure:
            raise RuleEvaluationError(failure.message, failure.position, self.source) from None


def parse_rule(source: str) -> Rule:
    """Parse and type-check a defrag rule; raises RuleSyntaxError pointing at the mistake."""
    if not isinstance(source, str):
        raise TypeError(f"a defrag rule must be a string, not {type(source).__name__}")
    if len(source) > MAX_RULE_CHARS:
        raise RuleSyntaxError(
            f"rule is too long: {len(source)} characters, at most {MAX_RULE_CHARS} are allowed",
            MAX_RULE_CHARS,
            source,
        )
    if source == "":
        # etcd-defrag: "etcd-defrag will run defragmentation if the rule is empty" (its --defrag-rule
        # help; eval.Evaluate returns true for len(rule) == 0 before goval sees it).
        return Rule(source=source, expression=Boolean(True, 0))
    return Rule(source=source, expression=_Parser(source).parse())


# --- tokenizer --------------------------------------------------------------------------------


class _TokenKind(Enum):
    NUMBER = "number"
    NAME = "name"
    OPERATOR = "operator"
    LEFT_PAREN = "("
    RIGHT_PAREN = ")"
    END = "end"


class _Token(NamedTuple):
    kind: _TokenKind
    text: str
    position: int
    value: float = 0.0


def _describe(token: _Token) -> str:
    return "end of rule" if token.kind is _TokenKind.END else repr(token.text)


class _Lexer:
    """Produces tokens on demand, so errors are reported in left-to-right order."""

    def __init__(self, source: str) -> None:
        self._source = source
        self._offset = 0

    def _error(self, message: str, position: int) -> RuleSyntaxError:
        return RuleSyntaxError(message, position, self._source)

    def next_token(self) -> _Token:
        source = self._source
        while self._offset < len(source) and source[self._offset] in _WHITESPACE:
            self._offset += 1
        start = self._offset
        if start >= len(source):
            return _Token(_TokenKind.END, "", start)
        char = source[start]
        if char in "()":
            self._offset += 1
            kind = _TokenKind.LEFT_PAREN if char == "(" else _TokenKind.RIGHT_PAREN
            return _Token(kind, char, start)
        if number := _NUMBER_RE.match(source, start):
            return self._number(number.group(), start)
        if name := _NAME_RE.match(source, start):
            self._offset = name.end()
            return _Token(_TokenKind.NAME, name.group(), start)
        for sequence, message in _REJECTED_SEQUENCES:
            if source.startswith(sequence, start) and not any(
                source.startswith(operator, start) and len(operator) >= len(sequence)
                for operator in _OPERATORS
            ):
                raise self._error(message, start)
        for operator in _OPERATORS:
            if source.startswith(operator, start):
                self._offset += len(operator)
                return _Token(_TokenKind.OPERATOR, operator, start)
        code_point = f" (U+{ord(char):04X})" if not char.isascii() or not char.isprintable() else ""
        raise self._error(f"unexpected character {char!r}{code_point}", start)

    def _number(self, text: str, start: int) -> _Token:
        end = start + len(text)
        tail = _NUMBER_TAIL_RE.match(self._source, end)
        if tail is not None and tail.group():
            literal = self._source[start : tail.end()]
            raise self._error(f"invalid number {literal!r}: write plain decimals like 200, 0.8 or 1e6", start)
        if len(text) > 1 and text[0] == "0" and text.isdigit():
            raise self._error(
                f"invalid number {text!r}: leading zeros are not allowed"
                " (etcd-defrag would read it as an octal number)",
                start,
            )
        try:
            value = float(int(text, 16)) if text[:2] in ("0x", "0X") else float(text)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise self._error(f"number {text!r} is too large", start)
        self._offset = end
        return _Token(_TokenKind.NUMBER, text, start, value)


# --- parser -----------------------------------------------------------------------------------


class _Operand(NamedTuple):
    """A parsed sub-expression with what type checking needs to know about it."""

    node: Expression
    kind: _Kind
    start: int  # where the sub-expression begins, for carets under a wrongly typed operand
    height: int  # levels of operations, bounded so evaluation cannot exhaust the stack
    constant: bool  # no variables: can be evaluated (and rejected) at parse time
    grouped: bool = False  # written in parentheses: '**' may follow it (see _check_power)


class _Parser:
    """Precedence-climbing parser that type-checks each node as it builds it."""

    def __init__(self, source: str) -> None:
        self._source = source
        self._lexer = _Lexer(source)
        self._token = self._lexer.next_token()

    def _error(self, message: str, position: int) -> RuleSyntaxError:
        return RuleSyntaxError(message, position, self._source)

    def _advance(self) -> _Token:
        token = self._token
        self._token = self._lexer.next_token()
        return token

    def parse(self) -> Expression:
        if self._token.kind is _TokenKind.END:
            raise self._error('rule is empty but for spaces; the empty rule "" means always defragment', 0)
        operand = self._binary(1, depth=0)
        token = self._token
        if token.kind is _TokenKind.RIGHT_PAREN:
            raise self._error("unmatched ')'", token.position)
        if token.kind is not _TokenKind.END:
            raise self._error(
                f"expected an operator or the end of the rule, got {_describe(token)}"
                f"{_word_operator_hint(token)}",
                token.position,
            )
        if operand.kind is not _Kind.CONDITION:
            raise self._error(
                f"rule must be a condition (true/false), got {operand.kind.value}", operand.start
            )
        return operand.node

    def _binary(self, min_precedence: int, depth: int) -> _Operand:
        left = self._unary(depth)
        while self._token.kind is _TokenKind.OPERATOR:
            precedence = _BINARY_PRECEDENCE.get(self._token.text)
            if precedence is None or precedence < min_precedence:
                break
            operator = self._advance()
            right = self._binary(precedence + 1, depth)
            left = self._combine(operator, left, right)
        return left

    def _combine(self, operator: _Token, left: _Operand, right: _Operand) -> _Operand:
        symbol = operator.text
        if symbol == "**":
            self._check_power(operator, left)
        if symbol in _LOGICAL:
            self._expect_operands(symbol, _Kind.CONDITION, left, right)
            kind = _Kind.CONDITION
        elif symbol in _EQUALITY:
            if left.kind is not right.kind:
                raise self._error(
                    f"'{symbol}' cannot compare {left.kind.value} with {right.kind.value}",
                    operator.position,
                )
            kind = _Kind.CONDITION
        else:
            if symbol in _ORDERING and isinstance(left.node, Binary) and left.node.operator in _ORDERING:
                raise self._error(
                    f"'{symbol}' cannot follow another comparison; write 'a < b && b < c'"
                    " instead of 'a < b < c'",
                    operator.position,
                )
            self._expect_operands(symbol, _Kind.NUMBER, left, right)
            kind = _Kind.NUMBER if symbol in _ARITHMETIC else _Kind.CONDITION
        height = 1 + max(left.height, right.height)
        if height > MAX_NESTING_DEPTH:
            raise self._error(
                f"rule is too complex: more than {MAX_NESTING_DEPTH} nested operations",
                operator.position,
            )
        node = Binary(symbol, left.node, right.node, operator.position)
        constant = left.constant and right.constant
        if symbol in ("/", "%") and right.constant and _eval_number(right.node, {}) == 0:
            what = "division" if symbol == "/" else "modulo"
            raise self._error(f"{what} by zero", operator.position)
        if constant and kind is _Kind.NUMBER:
            try:
                _eval_number(node, {})
            except _EvaluationFailure as failure:
                raise self._error(failure.message, failure.position) from None
        return _Operand(node, kind, left.start, height, constant)

    def _check_power(self, operator: _Token, left: _Operand) -> None:
        """Refuse `a * b ** c`, `a ** b ** c` and `-a ** b`: goval's grouping is not the usual one."""
        if left.grouped:
            return
        if isinstance(left.node, Binary) and left.node.operator in _MULTIPLICATIVE:
            inner = left.node.operator
            raise self._error(
                f"'**' after '{inner}' needs parentheses: etcd-defrag computes a {inner} b ** c as "
                f"(a {inner} b) ** c, not a {inner} (b ** c); write the one you mean",
                operator.position,
            )
        if isinstance(left.node, Unary) and left.node.operator == "-":
            raise self._error(
                "'**' after a unary '-' needs parentheses: etcd-defrag computes -a ** b as (-a) ** b, "
                "not -(a ** b); write the one you mean",
                operator.position,
            )

    def _expect_operands(self, symbol: str, kind: _Kind, left: _Operand, right: _Operand) -> None:
        for side, operand in (("left", left), ("right", right)):
            if operand.kind is not kind:
                raise self._error(
                    f"'{symbol}' needs {kind.value} on each side, but its {side} side is"
                    f" {operand.kind.value}",
                    operand.start,
                )

    def _check_depth(self, depth: int, token: _Token) -> None:
        if depth >= MAX_NESTING_DEPTH:
            raise self._error(
                f"rule is nested too deeply: more than {MAX_NESTING_DEPTH} levels of"
                " parentheses and unary operators",
                token.position,
            )

    def _unary(self, depth: int) -> _Operand:
        token = self._token
        if token.kind is not _TokenKind.OPERATOR or token.text not in ("!", "-"):
            return self._primary(depth)
        self._check_depth(depth, token)
        self._advance()
        operand = self._unary(depth + 1)
        if token.text == "!" and operand.kind is not _Kind.CONDITION:
            raise self._error(
                f"'!' needs a condition (true/false), got {operand.kind.value}"
                " ('!' applies only to what directly follows it: write '!(a > b)', not '!a > b')",
                operand.start,
            )
        if token.text == "-" and operand.kind is not _Kind.NUMBER:
            raise self._error(f"'-' needs a number, got {operand.kind.value}", operand.start)
        height = 1 + operand.height
        if height > MAX_NESTING_DEPTH:
            raise self._error(
                f"rule is too complex: more than {MAX_NESTING_DEPTH} nested operations",
                token.position,
            )
        node = Unary(token.text, operand.node, token.position)
        return _Operand(node, operand.kind, token.position, height, operand.constant)

    def _primary(self, depth: int) -> _Operand:
        token = self._token
        if token.kind is _TokenKind.NUMBER:
            self._advance()
            return _Operand(Number(token.value, token.position), _Kind.NUMBER, token.position, 0, True)
        if token.kind is _TokenKind.NAME:
            return self._name()
        if token.kind is _TokenKind.LEFT_PAREN:
            self._check_depth(depth, token)
            self._advance()
            inner = self._binary(1, depth + 1)
            closing = self._token
            if closing.kind is not _TokenKind.RIGHT_PAREN:
                raise self._error(
                    f"expected ')' to close the '(' at column {token.position + 1},"
                    f" got {_describe(closing)}{_word_operator_hint(closing)}",
                    closing.position,
                )
            self._advance()
            return inner._replace(start=token.position, grouped=True)
        hint = " (power is '**', with no space in between)" if token.text == "*" else ""
        raise self._error(f"expected an operand, got {_describe(token)}{hint}", token.position)

    def _name(self) -> _Operand:
        token = self._token
        name = token.text
        if name in _BOOLEAN_LITERALS:
            self._advance()
            node: Expression = Boolean(_BOOLEAN_LITERALS[name], token.position)
            return _Operand(node, _Kind.CONDITION, token.position, 0, True)
        if name in VARIABLES:
            self._advance()
            return _Operand(Variable(name, token.position), _Kind.NUMBER, token.position, 0, False)
        valid = ", ".join(VARIABLES)
        # Peek at the raw text rather than lex on, so a later bad character cannot pre-empt this error.
        if self._source[token.position + len(name) :].lstrip(" \t\r\n").startswith("("):
            raise self._error(
                f"unknown function {name!r}: defrag rules have no functions; valid variables are {valid}",
                token.position,
            )
        raise self._error(
            f"unknown variable {name!r}{_suggest(name)}; valid variables are {valid}",
            token.position,
        )


def _word_operator_hint(token: _Token) -> str:
    """Points ``and``/``or``/``not`` users at the operator they meant."""
    if token.kind is _TokenKind.NAME and token.text.lower() in _WORD_OPERATORS:
        return f" (use '{_WORD_OPERATORS[token.text.lower()]}' instead of '{token.text}')"
    return ""


def _suggest(name: str) -> str:
    """A "did you mean" hint for an unknown name, or an empty string."""
    if name.lower() in _WORD_OPERATORS:
        return f" (use '{_WORD_OPERATORS[name.lower()]}' instead)"
    candidates = (*VARIABLES, *_BOOLEAN_LITERALS)
    for candidate in candidates:
        if candidate.lower() == name.lower():
            return f" (did you mean {candidate!r}?)"
    matches = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


# --- evaluator --------------------------------------------------------------------------------


class _EvaluationFailure(Exception):
    """Raised inside the evaluator; turned into RuleEvaluationError or RuleSyntaxError."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(message, position)
        self.message = message
        self.position = position


def _first_uses(expression: Expression) -> dict[str, int]:
    """Each variable the expression reads, with the position of its first use."""
    uses: dict[str, int] = {}
    for node in _walk(expression):
        if isinstance(node, Variable):
            uses[node.name] = min(node.position, uses.get(node.name, node.position))
    return uses


def _checked_value(variables: Mapping[str, float], name: str, position: int, source: str) -> float:
    """The value of one variable as a finite float, or RuleEvaluationError."""
    try:
        raw: object = variables[name]
    except KeyError:
        raise RuleEvaluationError(f"no value for variable {name!r}", position, source) from None
    # bool is an int subclass; True is not a size.
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise RuleEvaluationError(
            f"variable {name!r} must be a number, got {type(raw).__name__}", position, source
        )
    try:
        value = float(raw)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise RuleEvaluationError(
            f"variable {name!r} is {raw!r}; only finite numbers can be compared safely",
            position,
            source,
        )
    return value


def _eval_number(node: Expression, values: Mapping[str, float]) -> float:
    match node:
        case Number(value=value):
            return value
        case Variable(name=name):
            return values[name]
        case Unary(operator="-", operand=operand):
            return -_eval_number(operand, values)
        case Binary(operator=operator, left=left, right=right, position=position):
            a = _eval_number(left, values)
            b = _eval_number(right, values)
            if operator in ("/", "%") and b == 0:
                what = "division" if operator == "/" else "modulo"
                raise _EvaluationFailure(f"{what} by zero", position)
            if operator == "+":
                result = a + b
            elif operator == "-":
                result = a - b
            elif operator == "*":
                result = a * b
            elif operator == "/":
                result = a / b
            elif operator == "**":
                result = _power(a, b, position)
            else:
                result = math.fmod(a, b)  # Go's math.Mod, which goval uses
            if not math.isfinite(result):
                raise _EvaluationFailure(f"result of '{operator}' is too large", position)
            return result
    raise AssertionError(f"not a numeric expression: {node!r}")


def _power(base: float, exponent: float, position: int) -> float:
    """math.Pow as goval computes it, but an error where Go would give NaN or an infinity."""
    try:
        return math.pow(base, exponent)
    except OverflowError:
        raise _EvaluationFailure("result of '**' is too large", position) from None
    except ValueError:  # a negative base to a fractional power, or zero to a negative one
        raise _EvaluationFailure(
            f"'**' has no finite real result for ({base:g}) ** ({exponent:g})", position
        ) from None


def _eval_condition(node: Expression, values: Mapping[str, float]) -> bool:
    match node:
        case Boolean(value=value):
            return value
        case Unary(operator="!", operand=operand):
            return not _eval_condition(operand, values)
        case Binary(operator="&&", left=left, right=right):
            return _eval_condition(left, values) and _eval_condition(right, values)
        case Binary(operator="||", left=left, right=right):
            return _eval_condition(left, values) or _eval_condition(right, values)
        case Binary(operator=operator, left=left, right=right) if operator in _EQUALITY:
            if _kind_of(left) is _Kind.CONDITION:
                same = _eval_condition(left, values) == _eval_condition(right, values)
            else:
                same = _eval_number(left, values) == _eval_number(right, values)
            return same if operator == "==" else not same
        case Binary(operator=operator, left=left, right=right) if operator in _ORDERING:
            a = _eval_number(left, values)
            b = _eval_number(right, values)
            if operator == "<":
                return a < b
            if operator == "<=":
                return a <= b
            if operator == ">":
                return a > b
            return a >= b
    raise AssertionError(f"not a condition: {node!r}")


def _render_error(header: str, message: str, position: int, source: str) -> str:
    """``header at column N: message`` plus the offending line with a caret under position."""
    line_start = source.rfind("\n", 0, position) + 1
    line_end = source.find("\n", position)
    if line_end == -1:
        line_end = len(source)
    column = position - line_start
    if "\n" in source:
        where = f"line {source.count(chr(10), 0, position) + 1}, column {column + 1}"
    else:
        where = f"column {column + 1}"
    line = source[line_start:line_end]
    excerpt_start = 0
    if len(line) > _EXCERPT_CHARS:
        excerpt_start = max(0, min(column - _EXCERPT_CHARS // 2, len(line) - _EXCERPT_CHARS))
    excerpt = line[excerpt_start : excerpt_start + _EXCERPT_CHARS]
    prefix = "..." if excerpt_start > 0 else ""
    suffix = "..." if excerpt_start + _EXCERPT_CHARS < len(line) else ""
    # Control characters would garble the caret alignment; tabs are kept so it lines up.
    shown = "".join(c if c == "\t" or c.isprintable() else "?" for c in excerpt)
    padding = "".join("\t" if c == "\t" else " " for c in shown[: column - excerpt_start])
    return f"{header} at {where}: {message}\n  {prefix}{shown}{suffix}\n  {' ' * len(prefix)}{padding}^"
