"""Bicep and .bicepparam files parsed with tree-sitter's Bicep grammar (tree-sitter-bicep on PyPI).

The grammar has no rule for a parameters file's `param name = value` assignment (it reads `param` as a declaration
that needs a type), so a .bicepparam file is parsed with each such line's keyword replaced by `var  `: the same
length, so every position in an error message is the file's own, and everything else (using, var, expressions,
comments) goes through the grammar unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import tree_sitter
import tree_sitter_bicep

Node = tree_sitter.Node

_PARAM_ASSIGNMENT = re.compile(rb"^param(\s+[A-Za-z_][A-Za-z0-9_]*\s*=)", re.M)


@dataclass(frozen=True)
class SyntaxProblem:
    line: int  # 1-based
    column: int  # 1-based
    message: str


@cache
def _parser() -> tree_sitter.Parser:
    return tree_sitter.Parser(tree_sitter.Language(tree_sitter_bicep.language()))


def params_as_bicep(source: bytes) -> bytes:
    """A .bicepparam file's text as the grammar reads it (see the module docstring)."""
    return _PARAM_ASSIGNMENT.sub(rb"var  \1", source)


def parse(source: bytes, *, params_file: bool = False) -> Node:
    text = params_as_bicep(source) if params_file else source
    return _parser().parse(text).root_node


def problems(root: Node) -> list[SyntaxProblem]:
    """Every ERROR and MISSING node of a tree, with where it is."""
    found: list[SyntaxProblem] = []

    def visit(node: Node) -> None:
        if node.is_missing:
            row, col = node.start_point
            found.append(SyntaxProblem(row + 1, col + 1, f"missing {node.type}"))
            return
        if node.type == "ERROR":
            row, col = node.start_point
            snippet = (node.text or b"").decode("utf-8", "replace").strip().splitlines()
            found.append(SyntaxProblem(row + 1, col + 1, f"syntax error at {snippet[0][:40] if snippet else ''!r}"))
            return
        if node.has_error:
            for child in node.children:
                visit(child)

    visit(root)
    if root.has_error and not found:  # an error the walk did not place
        found.append(SyntaxProblem(1, 1, "syntax error"))
    return found


def parse_file(path: Path) -> Node:
    return parse(path.read_bytes(), params_file=path.suffix == ".bicepparam")


def text(node: Node) -> str:
    return (node.text or b"").decode("utf-8")


def named(node: Node) -> list[Node]:
    """Named children that are not comments."""
    return [c for c in node.named_children if c.type not in ("comment", "diagnostic_comment")]


def string_value(node: Node) -> str | None:
    """The value of a string literal without interpolation; None for anything else."""
    if node.type != "string":
        return None
    parts: list[str] = []
    for child in node.named_children:
        if child.type == "string_content":
            parts.append(text(child))
        elif child.type == "escape_sequence":
            parts.append(unescape(text(child)))
        else:
            return None
    return "".join(parts)


_ESCAPES = {"\\n": "\n", "\\r": "\r", "\\t": "\t", "\\\\": "\\", "\\'": "'", "\\$": "$"}


def unescape(sequence: str) -> str:
    if sequence in _ESCAPES:
        return _ESCAPES[sequence]
    if sequence.startswith("\\u{"):
        return chr(int(sequence[3:-1], 16))
    return sequence
