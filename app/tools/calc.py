"""A calculator over an AST allow-list: numbers, arithmetic and a few math functions.

Never `eval`: the expression is parsed with `ast` and walked; anything that is not
a number, an allowed operator or an allowed function name is refused. Exponents,
intermediate sizes and nesting depth are bounded so `9**9**9` fails fast.

    >>> calculate("2 * (3 + 4) ** 2")
    98
    >>> calculate("__import__('os')")    # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    CalcError: not allowed: a call to something other than a known function
"""
from __future__ import annotations

import ast
import math
import operator
import re

MAX_EXPONENT = 1000
MAX_DIGITS = 4000
MAX_DEPTH = 100
MAX_LENGTH = 500

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS = {"sqrt": math.sqrt, "log": math.log, "log10": math.log10, "exp": math.exp, "sin": math.sin, "cos": math.cos,
          "tan": math.tan, "abs": abs, "round": round, "floor": math.floor, "ceil": math.ceil, "min": min, "max": max}
_CONSTS = {"pi": math.pi, "e": math.e}


def _pattern() -> str:
    """What an expression may contain, as a `schema.Pattern`: digits, decimal points, operators,
    parentheses, commas, spaces and the known names, with at least one number or name, and
    the first of them a digit or a name (".5" inside, never first: the bundled 135M model,
    left free, opened most expressions with a stray "." and computed .17 * .23).

    A name that the other pieces already spell (log10 = log, 1, 0) is left out, so each
    string splits one way only and `re` never backtracks exponentially over it."""
    sep, digits = "-+*/%(), ", "0-9."

    def build(names):
        alts = "|".join(names)
        return f"^[{sep}]*([0-9]|{alts})([{sep}{digits}]|{alts})*$"

    names = sorted([*_FUNCS, *_CONSTS], key=lambda n: (-len(n), n))
    names = [n for n in names if not re.fullmatch(build([m for m in names if m != n]), n)]
    return build(names)


PATTERN = _pattern()


class CalcError(ValueError):
    """The expression is not allowed or cannot be computed."""


def _check_size(value):
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_DIGITS * 3.33:
        raise CalcError(f"result too large (over {MAX_DIGITS} digits)")
    return value


def _eval(node, depth: int):
    if depth > MAX_DEPTH:
        raise CalcError(f"expression nested deeper than {MAX_DEPTH}")
    if isinstance(node, ast.Expression):
        return _eval(node.body, depth + 1)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTS:
        return _CONSTS[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left, depth + 1), _eval(node.right, depth + 1)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT:
                raise CalcError(f"exponent {right} is larger than {MAX_EXPONENT}")
            if isinstance(left, int) and isinstance(right, int) and right > 0 and left.bit_length() * right > MAX_DIGITS * 3.33:
                raise CalcError(f"result too large (over {MAX_DIGITS} digits)")
        try:
            return _check_size(_BINARY[type(node.op)](left, right))
        except (ZeroDivisionError, OverflowError, ValueError) as exc:
            raise CalcError(str(exc)) from None
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand, depth + 1))
    if isinstance(node, ast.Call):
        if not (isinstance(node.func, ast.Name) and node.func.id in _FUNCS) or node.keywords:
            raise CalcError("not allowed: a call to something other than a known function")
        args = [_eval(a, depth + 1) for a in node.args]
        try:
            return _check_size(_FUNCS[node.func.id](*args))
        except (TypeError, ValueError, OverflowError) as exc:
            raise CalcError(f"{node.func.id}: {exc}") from None
    raise CalcError(f"not allowed: {type(node).__name__.lower()} ({', '.join(sorted(_FUNCS))}, pi and e are known)")


def calculate(expression: str):
    if len(expression) > MAX_LENGTH:
        raise CalcError(f"expression longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise CalcError(f"not an expression: {exc.msg}") from None
    except RecursionError:
        raise CalcError(f"expression nested deeper than {MAX_DEPTH}") from None
    return _eval(tree, 0)
