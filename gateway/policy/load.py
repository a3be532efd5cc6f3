"""Text and files -> ``Policy``: parse, merge (a directory of files is one policy), validate, compile.

All diagnostics of all files are collected and raised together, sorted, in one ``PolicyError``; a
half-valid policy is never returned. Reading files is the only I/O in the policy package, and it
happens here, before anything is compiled.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path as FsPath
from typing import Any

from gateway.errors import PolicyError
from gateway.policy.diagnostics import Diagnostic, sort_diagnostics
from gateway.policy.engine import Policy, canonical_revision
from gateway.policy.syntax import Document, document_from_data, parse_yaml
from gateway.policy.validate import validate, validate_deferred

__all__ = ["compile_policy", "compile_document", "compile_data", "load_policy", "load_document", "check_policy"]

_LIST_SECTIONS = ("devices", "denylist", "grants", "rules")
_MAP_SECTIONS = ("data_classes", "vendors", "device_types", "destinations", "defaults")


def compile_document(doc: Document) -> Policy:
    # Compiling a large site allocates tens of thousands of long-lived objects and nothing cyclic:
    # the cyclic GC would only re-scan them on every generation threshold (measured: a fifth of the
    # compile time at 10k rules). It is paused for the compile and resumed as it was.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        spec, diags, lints = validate_deferred(doc)
        errors = [d for d in diags if d.severity == "error"]
        if spec is None or errors:
            raise PolicyError(sort_diagnostics(errors or diags))
        found = [d for d in diags if d.severity == "warning"]
        # warnings never stop a policy: the lints run when someone reads Policy.warnings
        return Policy(spec, revision=canonical_revision(doc.data), source=doc.source,
                      warnings=lambda: sort_diagnostics(found + lints()))
    finally:
        if was_enabled:
            gc.enable()


def compile_data(data: Any, *, source: str = "<policy>") -> Policy:
    """Compile the plain data ``yaml.safe_load`` would give for a policy file (no positions)."""
    return compile_document(document_from_data(data, source=source))


def compile_policy(text: str, *, source: str = "<policy>") -> Policy:
    doc, diags = parse_yaml(text, source=source)
    if doc is None or any(d.severity == "error" for d in diags):
        if doc is not None:  # report the structural errors too, so the operator sees everything at once
            _, more = validate(doc)
            diags = diags + [d for d in more if d.severity == "error"]
        raise PolicyError(sort_diagnostics([d for d in diags if d.severity == "error"]))
    return compile_document(doc)


def check_policy(path: str | os.PathLike[str]) -> tuple[Policy | None, list[Diagnostic]]:
    """Every diagnostic (errors and warnings) for the policy at ``path``; the Policy when it compiles."""
    doc, diags = load_document(path)
    if doc is None:
        return None, sort_diagnostics(diags)
    spec, more = validate(doc)
    all_diags = sort_diagnostics(diags + more)
    if spec is None or any(d.severity == "error" for d in all_diags):
        return None, all_diags
    policy = Policy(spec, revision=canonical_revision(doc.data), source=doc.source,
                    warnings=[d for d in all_diags if d.severity == "warning"])
    return policy, all_diags


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """A policy file, or a directory whose ``*.yaml`` files (not ``cases/``) are merged into one."""
    doc, diags = load_document(path)
    if doc is None or any(d.severity == "error" for d in diags):
        if doc is not None:
            _, more = validate(doc)
            diags = diags + [d for d in more if d.severity == "error"]
        raise PolicyError(sort_diagnostics([d for d in diags if d.severity == "error"]))
    return compile_document(doc)


def policy_files(path: str | os.PathLike[str]) -> list[FsPath]:
    p = FsPath(path)
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.suffix in (".yaml", ".yml") and f.is_file())
    return [p]


def load_document(path: str | os.PathLike[str]) -> tuple[Document | None, list[Diagnostic]]:
    files = policy_files(path)
    if not files:
        return None, [Diagnostic(str(path), 0, 0, "io.no_files", "no *.yaml policy files in this directory")]
    docs: list[Document] = []
    diags: list[Diagnostic] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            diags.append(Diagnostic(str(f), 0, 0, "io.read", f"cannot read the policy file: {exc}"))
            continue
        doc, d = parse_yaml(text, source=str(f))
        diags.extend(d)
        if doc is not None:
            docs.append(doc)
    if not docs:
        return None, diags
    if len(files) == 1:
        return docs[0], diags
    merged, d = merge_documents(docs, source=str(path))
    return merged, diags + d


def merge_documents(docs: list[Document], *, source: str) -> tuple[Document, list[Diagnostic]]:
    """Several files -> one document. Lists concatenate in file order; named maps must not repeat a
    name; scalars must agree. Positions keep pointing at the file that wrote each part, and rules
    without an explicit id get ``<file stem>.<section>[<index in that file>]``."""
    out = Document({}, source)
    data: dict[str, Any] = out.data
    diags: list[Diagnostic] = []
    for doc in docs:
        stem = FsPath(doc.source).stem
        if not isinstance(doc.data, dict):
            f, line, col = doc.pos(())
            diags.append(Diagnostic(f, line, col, "schema.type", "a policy file must be a mapping of sections"))
            continue
        offsets: dict[str, int] = {}
        renamed: dict[str, str] = {}
        for key, value in doc.data.items():
            if key in _LIST_SECTIONS and isinstance(value, list):
                offsets[key] = len(data.setdefault(key, [])) if isinstance(data.get(key, []), list) else 0
                if isinstance(data[key], list):
                    data[key].extend(value)
                for i in range(len(value)):
                    out.derived_ids[(key, offsets[key] + i)] = f"{stem}.{key}[{i}]"
            elif key in _MAP_SECTIONS and isinstance(value, dict) and isinstance(data.get(key, {}), dict):
                section = data.setdefault(key, {})
                for name, body in value.items():
                    if name in section:
                        f, line, col = doc.pos((key, name), key=True)
                        first = out.pos((key, name), key=True)
                        diags.append(Diagnostic(f, line, col, "merge.duplicate",
                                                f"{key}.{name} is also defined in another file",
                                                f"first defined at {first[0]}:{first[1]}:{first[2]}"))
                        renamed[f"{key}\0{name}"] = "skip"
                    else:
                        section[name] = body
            elif key in data:
                if data[key] != value:
                    f, line, col = doc.pos((key,), key=True)
                    first = out.pos((key,), key=True)
                    diags.append(Diagnostic(f, line, col, "merge.conflict",
                                            f"{key!r} differs from the value in another file",
                                            f"first set at {first[0]}:{first[1]}:{first[2]}; set it in one file"))
                renamed[key] = "skip"
            else:
                data[key] = value
        for table_name in ("positions", "key_positions"):
            src: dict[Any, Any] = getattr(doc, table_name)
            dst: dict[Any, Any] = getattr(out, table_name)
            for path, pos in src.items():
                if not path:
                    continue
                head = path[0]
                if renamed.get(head) == "skip" or (
                    len(path) > 1 and renamed.get(f"{head}\0{path[1]}") == "skip"
                ):
                    continue
                if head in offsets and len(path) > 1 and isinstance(path[1], int):
                    path = (head, path[1] + offsets[head], *path[2:])
                elif head in offsets and len(path) == 1 and path in dst:
                    continue
                dst.setdefault(path, pos)
    return out, diags
