"""YAML text -> plain data plus a position table, without losing ``line:col``.

PyYAML's ``safe_load`` throws positions away, so this walks the composed node graph
(``yaml.compose``; LibYAML's parser when present) and builds the same plain data ``safe_load`` would,
plus ``positions``: path -> (file, line, col) of every value and ``key_positions`` for every mapping
key. A path is a tuple of mapping keys and list indices from the document root. Duplicate keys, which
``safe_load`` silently collapses, are reported. Never raises on bad input: it returns diagnostics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

from gateway.policy.diagnostics import Diagnostic

__all__ = ["Document", "Path", "Pos", "parse_yaml", "document_from_data"]

Path = tuple[str | int, ...]
Pos = tuple[str, int, int]

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MAX_TEXT = 16 * 1024 * 1024  # a policy larger than this is a mistake, not a policy
_MAX_ALIAS_NODES = 10_000  # nodes reached through aliases, in all


@dataclass(slots=True)
class Document:
    """A policy document: plain data (dict/list/str/int/float/bool/None) and where each part was written."""

    data: Any
    source: str
    positions: dict[Path, Pos] = field(default_factory=dict)
    key_positions: dict[Path, Pos] = field(default_factory=dict)
    # rule ids derived from position: (section, index) -> id, filled when several files are merged
    derived_ids: dict[Path, str] = field(default_factory=dict)

    def pos(self, path: Path, *, key: bool = False) -> Pos:
        """The position of ``path`` (its key when ``key``), else of its nearest written ancestor."""
        table = self.key_positions if key else self.positions
        p = table.get(path)
        if p is not None:
            return p
        while path:
            path = path[:-1]
            p = self.positions.get(path)
            if p is not None:
                return p
        return (self.source, 0, 0)


def document_from_data(data: Any, *, source: str = "<policy>") -> Document:
    """A document built in code (the same dict ``yaml.safe_load`` would give): no positions."""
    return Document(data, source)


def parse_yaml(text: str, *, source: str = "<policy>") -> tuple[Document | None, list[Diagnostic]]:
    if len(text) > _MAX_TEXT:
        return None, [Diagnostic(source, 1, 1, "syntax.too_large", f"policy text over {_MAX_TEXT} bytes")]
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        problem = exc.problem or exc.context or "malformed YAML"
        hint = "check indentation (spaces, not tabs), quoting and the ':' after each key"
        lines = text.splitlines()
        if mark is not None and mark.line < len(lines) and "{" in lines[mark.line] and "[" in lines[mark.line]:
            hint = "inside [...] or {...}, quote values holding { } [ ] or ',' - e.g. \"site/{site}/dev/{device}/result\""
        elif mark is not None and mark.line < len(lines) and "\t" in lines[mark.line]:
            hint = "YAML indents with spaces; this line has a tab"
        return None, [Diagnostic(source, line, col, "syntax.yaml", f"YAML: {problem}", hint)]
    except yaml.YAMLError as exc:
        return None, [Diagnostic(source, 1, 1, "syntax.yaml", f"YAML: {exc}")]
    doc = Document(None, source)
    if node is None:
        doc.data = {}
        return doc, []
    diags: list[Diagnostic] = []
    doc.data = _Walker(source, doc, diags).walk(node, ())
    return doc, diags


class _Walker:
    def __init__(self, source: str, doc: Document, diags: list[Diagnostic]) -> None:
        self.source = source
        self.doc = doc
        self.diags = diags
        self.ctor = SafeConstructor()
        self.seen: set[int] = set()
        self.in_alias = False
        self.alias_nodes = 0
        self.exhausted = False

    def at(self, node: yaml.Node) -> Pos:
        return (self.source, node.start_mark.line + 1, node.start_mark.column + 1)

    def walk(self, node: yaml.Node, path: Path, depth: int = 0) -> Any:
        if self.exhausted:
            return None
        # An alias is the same node object met again. Expanding aliases is bounded (a few hundred
        # bytes of nested aliases expand to millions of nodes: "billion laughs"); plain text is not.
        node_id = id(node)
        revisit = node_id in self.seen
        if revisit or self.in_alias:
            self.alias_nodes += 1
            if self.alias_nodes > _MAX_ALIAS_NODES:
                self.exhausted = True
                self.diags.append(Diagnostic(*self.at(node), "syntax.too_large",
                                             f"aliases expand to more than {_MAX_ALIAS_NODES} nodes",
                                             "write the repeated parts out, or use fewer nested aliases"))
                return None
        else:
            self.seen.add(node_id)
        if revisit and not self.in_alias:
            self.in_alias = True
            try:
                return self.walk(node, path, depth)
            finally:
                self.in_alias = False
        self.doc.positions[path] = self.at(node)
        if depth > 64:
            self.diags.append(Diagnostic(*self.at(node), "syntax.too_deep", "nesting deeper than 64 levels"))
            return None
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for knode, vnode in node.value:
                if not isinstance(knode, yaml.ScalarNode):
                    self.diags.append(Diagnostic(*self.at(knode), "syntax.key_type", "a key must be a plain scalar"))
                    continue
                key = self.scalar(knode)
                if not isinstance(key, str):
                    key = str(key)  # `1: x` or `on: x` - keys are names; the validator rejects what it does not know
                if key in out:
                    first = self.doc.key_positions[(*path, key)]
                    self.diags.append(
                        Diagnostic(*self.at(knode), "syntax.duplicate_key", f"duplicate key {key!r}",
                                   f"first written at line {first[1]}; YAML keeps only the last, so merge them")
                    )
                    continue
                self.doc.key_positions[(*path, key)] = self.at(knode)
                out[key] = self.walk(vnode, (*path, key), depth + 1)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.walk(item, (*path, i), depth + 1) for i, item in enumerate(node.value)]
        return self.scalar(node)

    def scalar(self, node: yaml.Node) -> Any:
        try:
            return self.ctor.construct_object(node, deep=True)
        except Exception as exc:  # noqa: BLE001 - untrusted text: SafeConstructor raises KeyError, IndexError...
            self.diags.append(Diagnostic(*self.at(node), "syntax.scalar", f"unreadable value {node.value!r}",
                                         f"{type(exc).__name__}: remove the explicit tag or fix the value"))
            return None
