"""Plain policy data -> ``PolicySpec``, with every problem reported at once.

The validator is the only place that knows the file format (docs/policy.md is its prose twin and
policies/policy.schema.json its JSON Schema twin). It never stops at the first problem: each check
records a ``Diagnostic`` at the offending key or value and carries on with a safe stand-in, so an
operator sees every error of a file in one run. Warnings (``lint.*``, ``ref.*``) flag rules that can
never match, reach into another device's namespace, or name classes/destinations that do not exist;
they never stop a policy from going live.
"""

from __future__ import annotations

import difflib
import re
from itertools import chain, repeat
from operator import itemgetter
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar, cast

from gateway.catalog import DATA_CLASSES, DEVICE_TYPES, STREAMS
from gateway.policy.diagnostics import Diagnostic, Severity
from gateway.policy.spec import (
    ALWAYS,
    DataClassSpec,
    DenySpec,
    DestinationSpec,
    DeviceSpec,
    DeviceTypeSpec,
    GrantSpec,
    Mode,
    ObligationSpec,
    PolicySpec,
    RuleSpec,
    VendorSpec,
    When,
)
from gateway.policy.syntax import Document, Path

__all__ = ["validate", "validate_deferred", "BUILTIN_RULES", "FORMAT_VERSION", "TOP_KEYS", "is_glob", "filter_error"]

FORMAT_VERSION = 1

# Built-in checks have rule ids too, so a decision always names what decided it.
BUILTIN_RULES: tuple[str, ...] = (
    "builtin.site",
    "builtin.registry",
    "builtin.namespace",
    "builtin.default_deny",
    "builtin.size_limit",
    "builtin.jurisdiction",
    "builtin.contract",
    "builtin.prohibited",
    "builtin.vault_only",
    "builtin.residency",
    "builtin.empty",
)

TOP_KEYS = frozenset(
    {
        "edgeward_policy", "site", "jurisdiction", "allowed_jurisdictions", "defaults", "data_classes",
        "vendors", "device_types", "devices", "denylist", "grants", "rules", "destinations", "description",
    }
)
_DEFAULTS_KEYS = frozenset({"on_disallowed_field", "drop_when_empty", "require_registered"})
_CLASS_KEYS = frozenset({"vault_only", "reside", "description"})
_VENDOR_KEYS = frozenset({"maintenance_contract", "description"})
_TYPE_KEYS = frozenset({"id", "max_size", "description"})
_DEVICE_KEYS = frozenset({"id", "type", "vendor", "maintenance", "description"})
_DENY_KEYS = frozenset({"id", "device", "description"})
_GRANT_KEYS = frozenset({"id", "devices", "device_types", "topics", "description"})
_DEVICE_FAST_KEYS = frozenset({"id", "type", "vendor", "maintenance"})  # a fast-path device entry
_OPT_BOOL = (type(None), bool)
_RULE_KEYS = frozenset({"id", "effect", "destinations", "classes", "fields", "when", "description"})
_WHEN_KEYS = frozenset({"devices", "device_types", "vendors", "streams", "topics"})
_DEST_KEYS = frozenset(
    {
        "jurisdiction", "trust", "transport", "topic", "rest_at_edge", "recipient_key", "on_disallowed_field",
        "requires_contract", "drop_when_empty", "obligations", "description", "retime_ms", "spool",
        "bundle",
    }
)
_SPOOL_KEYS = frozenset({"max_mb", "when_full"})
SPOOL_WHEN_FULL = ("refuse_new", "drop_oldest")
DEFAULT_RETIME_MS = 5000  # uplinks leave in gateway-timed batches (mean 5 s, jittered) unless a destination says otherwise
DEFAULT_SPOOL_MB = 256.0
DEFAULT_BUNDLE = 64  # envelopes an mqtt uplink carries in one MQTT message, at most
MAX_BUNDLE = 1000
_OBL_KEYS = frozenset({"id", "when", "remove", "quantize", "drop", "description"})
_SELECT_KEYS = frozenset({"fields", "classes"})
TRUST_LEVELS = ("site", "high", "medium", "low", "untrusted")
_OBL_KINDS: tuple[Literal["remove", "quantize", "drop"], ...] = ("remove", "quantize", "drop")
_Choice = TypeVar("_Choice", bound=str)  # one of an enum's choices (a Literal where the spec wants one)
_ID_RE = re.compile(r"[A-Za-z0-9_.:/@-]{1,128}\Z")
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
_DEVICE_RE = re.compile(r"[A-Za-z0-9_.*?\[\]!-]{1,128}\Z")
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
_PLACEHOLDERS = frozenset({"site", "device"})
# a valid topic filter without placeholders, in one C-level match (the fast path for big registries)
_PLAIN_FILTER_RE = re.compile(r"(?:#|(?:\+|[^+#/{}\x00]*)(?:/(?:\+|[^+#/{}\x00]*))*(?:/#)?)\Z")


def is_glob(pattern: str) -> bool:
    return "*" in pattern or "?" in pattern or "[" in pattern


def filter_error(f: str) -> str:
    """Why ``f`` is not a valid MQTT topic filter ('' when it is)."""
    if not f:
        return "an empty topic filter"
    if "\x00" in f:
        return "a NUL character"
    if "+" not in f and "#" not in f:
        return ""
    levels = f.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != last):
            return "'#' must be a whole level and the last one"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return ""


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else ""


class _V:
    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.diags: list[Diagnostic] = []
        self.order = 0
        self.ids: dict[str, Path] = {}

    # -- reporting ---------------------------------------------------------------------------------
    def report(self, path: Path, code: str, message: str, hint: str = "", *, key: bool = False,
               severity: Severity = "error") -> None:
        f, line, col = self.doc.pos(path, key=key)
        self.diags.append(Diagnostic(f, line, col, code, message, hint, severity))

    def warn(self, path: Path, code: str, message: str, hint: str = "", *, key: bool = False) -> None:
        self.report(path, code, message, hint, key=key, severity="warning")

    # -- shapes ------------------------------------------------------------------------------------
    def mapping(self, path: Path, v: Any, allowed: frozenset[str], what: str) -> dict[str, Any]:
        if not isinstance(v, dict):
            self.report(path, "schema.type", f"{what} must be a mapping, not {_kind(v)}")
            return {}
        extra = v.keys() - allowed
        if extra:
            for k in sorted(map(str, extra)):
                self.report((*path, k), "schema.unknown_key", f"unknown key {k!r} in {what}",
                            _suggest(k, allowed) or f"allowed keys: {', '.join(sorted(allowed))}", key=True)
        return v

    def name_map(self, path: Path, v: Any, what: str) -> dict[str, Any]:
        if v is None:
            return {}
        if not isinstance(v, dict):
            self.report(path, "schema.type", f"{what} must be a mapping of name -> settings, not {_kind(v)}")
            return {}
        for k in v:
            if not _NAME_RE.match(k):
                self.report((*path, k), "value.name", f"{what} name {k!r} is not a plain name",
                            "use letters, digits, '_', '.', '-' (at most 64)", key=True)
        return v

    def seq(self, path: Path, v: Any, what: str) -> list[Any]:
        if v is None:
            return []
        if not isinstance(v, list):
            self.report(path, "schema.type", f"{what} must be a list, not {_kind(v)}")
            return []
        return v

    def string(self, path: Path, v: Any, what: str, *, required: bool = True) -> str | None:
        if isinstance(v, str) and v:
            return v
        if v is None and not required:
            return None
        self.report(path, "schema.type", f"{what} must be a non-empty string, not {_kind(v)}",
                    "quote values YAML would read as numbers, booleans or dates")
        return None

    def boolean(self, path: Path, v: Any, what: str, default: bool) -> bool:
        if v is None:
            return default
        if isinstance(v, bool):
            return v
        self.report(path, "schema.type", f"{what} must be true or false, not {_kind(v)}")
        return default

    def enum(self, path: Path, v: Any, choices: tuple[_Choice, ...], what: str, default: _Choice) -> _Choice:
        if v is None:
            return default
        if v in choices:
            return cast(_Choice, str(v))  # equal to one of the choices
        self.report(path, "schema.enum", f"{what} must be one of {', '.join(choices)}; got {v!r}",
                    _suggest(str(v), choices) or f"write one of: {', '.join(choices)}")
        return default

    def strings(self, path: Path, v: Any, what: str, *, star: bool = False) -> tuple[str, ...] | None:
        """A list of non-empty strings; ``'*'`` (when ``star``) or absent -> None (any)."""
        if v is None or (star and v == "*"):
            return None
        if isinstance(v, str):
            v = [v]
        elif not isinstance(v, list):
            self.report(path, "schema.type", f"{what} must be a list of strings, not {_kind(v)}")
            return ()
        out = []
        for i, item in enumerate(v):
            if isinstance(item, str) and item:
                out.append(item)
            else:
                self.report((*path, i), "schema.type", f"each of {what} must be a non-empty string, not {_kind(item)}",
                            "quote values YAML would read as numbers, booleans or dates")
        return tuple(out)

    def rule_id(self, path: Path, v: dict[str, Any], derived: str) -> str:
        rid = v.get("id")
        if rid is None:
            rid = self.doc.derived_ids.get(path, derived)
        elif not isinstance(rid, str) or not _ID_RE.match(rid) or rid.startswith("builtin."):
            self.report((*path, "id"), "value.rule_id", f"rule id {rid!r} is not usable",
                        "use 1-128 of letters, digits and _ . : / @ -, not starting with 'builtin.'")
            rid = self.doc.derived_ids.get(path, derived)
        if rid in self.ids:
            first = self.doc.pos(self.ids[rid])
            self.report((*path, "id") if "id" in v else path, "value.duplicate_id", f"rule id {rid!r} used twice",
                        f"first used at {first[0]}:{first[1]}:{first[2]}; every rule id must be unique")
        else:
            self.ids[rid] = path
        return rid

    def next_order(self) -> int:
        self.order += 1
        return self.order

    def topic_filter(self, path: Path, f: str) -> None:
        why = filter_error(f)
        if why:
            self.report(path, "value.topic_filter", f"{f!r} is not an MQTT topic filter: {why}",
                        "'+' matches one whole level, '#' only as the last level")
        if "{" in f or "}" in f:
            for name in _PLACEHOLDER_RE.findall(f):
                if name not in _PLACEHOLDERS:
                    self.report(path, "value.placeholder", f"unknown placeholder {{{name}}} in {f!r}",
                                "only {site} and {device} are substituted")
            if _PLACEHOLDER_RE.sub("", f).count("{") or _PLACEHOLDER_RE.sub("", f).count("}"):
                self.report(path, "value.placeholder", f"unbalanced brace in {f!r}")

    def device_pattern(self, path: Path, p: str) -> None:
        if not _DEVICE_RE.match(p):
            self.report(path, "value.device_pattern", f"{p!r} is not a device id or glob",
                        "ids use letters, digits, '_', '.', '-'; globs add '*', '?', '[...]'")

    def when(self, path: Path, v: Any) -> When:
        if v is None:
            return ALWAYS
        m = self.mapping(path, v, _WHEN_KEYS, "when")
        devices = self.strings((*path, "devices"), m.get("devices"), "when.devices", star=True)
        for i, d in enumerate(devices or ()):
            self.device_pattern((*path, "devices", i), d)
        topics = self.strings((*path, "topics"), m.get("topics"), "when.topics", star=False)
        for i, t in enumerate(topics or ()):
            self.topic_filter((*path, "topics", i), t)
        streams = self.strings((*path, "streams"), m.get("streams"), "when.streams", star=True)
        for i, s in enumerate(streams or ()):
            if s not in STREAMS:
                self.warn((*path, "streams", i), "ref.unknown_stream", f"stream {s!r} is not a catalogue stream",
                          f"known streams: {', '.join(STREAMS)}")
        types = self.strings((*path, "device_types"), m.get("device_types"), "when.device_types", star=True)
        vendors = self.strings((*path, "vendors"), m.get("vendors"), "when.vendors", star=True)
        w = When(
            devices=devices,
            device_types=None if types is None else frozenset(types),
            vendors=None if vendors is None else frozenset(vendors),
            streams=None if streams is None else frozenset(streams),
            topics=topics,
        )
        return w


def _kind(v: Any) -> str:
    if v is None:
        return "nothing (null)"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(v), type(v).__name__)


_DEVICE_CHARS_RE = re.compile(r"[A-Za-z0-9_.*?\[\]!\n-]*")
_ID_CHARS_RE = re.compile(r"[A-Za-z0-9_.:/@\n-]*")


def _plain_names(names: list[str], chars: re.Pattern[str]) -> bool:
    """Every name a str of 1-128 allowed characters: a single C-level scan of the joined text."""
    joined = "\n".join(names)  # TypeError on a non-str, which the caller treats as "not fast"
    return bool(chars.fullmatch(joined)) and min(map(len, names)) >= 1 and max(map(len, names)) <= 128


def _plain_filters(filters: list[str]) -> bool:
    """Every filter valid and placeholder-free, decided with whole-text counts instead of a loop."""
    if not filters:
        return True
    j = "\n" + "\n".join(filters) + "\n"
    if "\n\n" in j or "{" in j or "}" in j or "\x00" in j:
        return False
    # A wildcard is a whole level when both its neighbours are separators ('/' or the '\n' between
    # filters); '#' must also be last. Each character has one left and one right neighbour, so
    # counting the good pairs on each side must account for every wildcard.
    hashes = j.count("#")
    if hashes and (j.count("/#") + j.count("\n#") != hashes or j.count("#\n") != hashes):
        return False
    plus = j.count("+")
    if plus and (j.count("/+") + j.count("\n+") != plus or j.count("+/") + j.count("+\n") != plus):
        return False
    return True


_NONE_BOOL = {type(None), bool}


def _fast_devices(items: list[Any], known_types: set[str], vendors: dict[str, Any], derived: dict[Path, str],
                  first_order: int) -> list[DeviceSpec] | None:
    """Column-wise checks of a large, well-formed registry at C speed; None means "take the slow path",
    which finds and reports whatever is wrong."""
    try:
        if not items or set(map(type, items)) != {dict}:
            return None
        # exactly three keys and all three found (KeyError otherwise) = exactly id, type and vendor
        three = set(map(len, items)) == {3}
        if not three and not all(map(_DEVICE_FAST_KEYS.issuperset, items)):
            return None
        ids, types, vends = map(list, zip(*map(itemgetter("id", "type", "vendor"), items)))
        maint: list[Any] = [None] * len(items) if three else [x.get("maintenance") for x in items]
        if not _plain_names(ids, _DEVICE_CHARS_RE):
            return None
        if not set(types) <= known_types or (vendors and not set(vends) <= vendors.keys()):
            return None
        if set(map(type, types)) != {str} or set(map(type, vends)) != {str} or not all(vends):
            return None
        if not set(map(type, maint)) <= _NONE_BOOL:
            return None
    except (KeyError, TypeError):
        return None
    n = len(items)
    rids = [derived.get(("devices", i)) or f"devices[{i}]" for i in range(n)] if derived else list(
        map("devices[{}]".format, range(n)))
    rows = zip(ids, types, vends, maint, rids, range(first_order, first_order + n))
    return list(map(tuple.__new__, repeat(DeviceSpec), rows))


def _fast_grants(items: list[Any], taken: dict[str, Path], first_order: int) -> list[GrantSpec] | None:
    """As ``_fast_devices``, for grants that name exact devices and plain filters with explicit ids."""
    try:
        if not items or set(map(type, items)) != {dict} or set(map(len, items)) != {3}:
            return None  # exactly three keys, each looked up below: id, devices, topics
        ids, devs, tops = map(list, zip(*map(itemgetter("id", "devices", "topics"), items)))
        if set(map(type, devs)) != {list} or set(map(type, tops)) != {list} or not all(devs):
            return None
        if not _plain_names(ids, _ID_CHARS_RE) or len(set(ids)) != len(ids) or not taken.keys().isdisjoint(ids):
            return None
        if ids[0].startswith("builtin.") or "\nbuiltin." in "\n".join(ids):
            return None
        flat_devs = list(chain.from_iterable(devs))
        flat_tops = list(chain.from_iterable(tops))
        if not _plain_names(flat_devs, _DEVICE_CHARS_RE) or not _plain_filters(flat_tops):
            return None
    except (KeyError, TypeError):
        return None
    n = len(items)
    taken.update(zip(ids, zip(repeat("grants"), range(n))))
    # tuple.__new__ straight from C: the NamedTuple's Python-level __new__ would cost more than the checks
    rows = zip(ids, range(first_order, first_order + n), map(tuple, devs), repeat(None), map(tuple, tops))
    return list(map(tuple.__new__, repeat(GrantSpec), rows))


def validate(doc: Document) -> tuple[PolicySpec | None, list[Diagnostic]]:
    """Check ``doc`` and build its ``PolicySpec``; the spec is None when any error was found.
    The diagnostics include the lints' warnings."""
    spec, diags, lints = validate_deferred(doc)
    return spec, diags + lints()


def validate_deferred(doc: Document) -> tuple[PolicySpec | None, list[Diagnostic], Callable[[], list[Diagnostic]]]:
    """As ``validate``, but the lints (advisory warnings, never errors) run only when the returned
    callable is called: a policy going live does not wait for them."""
    v = _V(doc)
    top = v.mapping((), doc.data, TOP_KEYS, "the policy")

    version = top.get("edgeward_policy")
    if version is None:
        v.report((), "schema.missing_key", "missing key 'edgeward_policy'",
                 f"start the policy with `edgeward_policy: {FORMAT_VERSION}`")
    elif version != FORMAT_VERSION or isinstance(version, bool):
        v.report(("edgeward_policy",), "value.version", f"unsupported policy format {version!r}",
                 f"this gateway reads format {FORMAT_VERSION}")
    site = ""
    jurisdiction = ""
    for key in ("site", "jurisdiction"):
        if key not in top:
            v.report((), "schema.missing_key", f"missing key {key!r}",
                     "e.g. `site: AMS-T1`" if key == "site" else "e.g. `jurisdiction: NL`")
        else:
            val = v.string((key,), top[key], key) or ""
            if key == "site":
                site = val
                if val and ("/" in val or "+" in val or "#" in val):
                    v.report(("site",), "value.site", f"site {val!r} may not contain '/', '+' or '#'",
                             "it is one level of every topic")
            else:
                jurisdiction = val
    aj = v.strings(("allowed_jurisdictions",), top.get("allowed_jurisdictions"), "allowed_jurisdictions")
    allowed_j = frozenset(aj) if aj is not None else frozenset({"on_prem", jurisdiction})

    dflt = v.mapping(("defaults",), top.get("defaults") or {}, _DEFAULTS_KEYS, "defaults")
    mode: Mode = v.enum(("defaults", "on_disallowed_field"), dflt.get("on_disallowed_field"),
                        ("remove", "deny"), "on_disallowed_field", "remove")
    drop_empty = v.boolean(("defaults", "drop_when_empty"), dflt.get("drop_when_empty"), "drop_when_empty", True)
    require_reg = v.boolean(("defaults", "require_registered"), dflt.get("require_registered"),
                            "require_registered", True)

    # data classes: the catalogue's are built in; a file may say where they reside
    classes: dict[str, DataClassSpec] = {c: DataClassSpec(c) for c in DATA_CLASSES}
    for name, body in v.name_map(("data_classes",), top.get("data_classes"), "data class").items():
        p: Path = ("data_classes", name)
        if name not in DATA_CLASSES:
            v.warn(p, "ref.unknown_class", f"data class {name!r} is not in the catalogue",
                   _suggest(name, DATA_CLASSES) or "no device field carries it, so it never matches", key=True)
        m = v.mapping(p, body or {}, _CLASS_KEYS, f"data class {name!r}")
        reside = v.strings((*p, "reside"), m.get("reside"), "reside", star=True)
        classes[name] = DataClassSpec(name, v.boolean((*p, "vault_only"), m.get("vault_only"), "vault_only", False),
                                      None if reside is None else frozenset(reside))

    vendors: dict[str, VendorSpec] = {}
    for name, body in v.name_map(("vendors",), top.get("vendors"), "vendor").items():
        p = ("vendors", name)
        m = v.mapping(p, body or {}, _VENDOR_KEYS, f"vendor {name!r}")
        vendors[name] = VendorSpec(name, v.boolean((*p, "maintenance_contract"), m.get("maintenance_contract"),
                                                   "maintenance_contract", False))

    denylist: list[DenySpec] = []
    for i, item in enumerate(v.seq(("denylist",), top.get("denylist"), "denylist")):
        p = ("denylist", i)
        if isinstance(item, str):
            pattern: str | None = item
            rid = doc.derived_ids.get(p, f"denylist[{i}]")
            if rid in v.ids:
                v.report(p, "value.duplicate_id", f"rule id {rid!r} used twice")
            v.ids[rid] = p
        else:
            m = v.mapping(p, item, _DENY_KEYS, "a denylist entry")
            pattern = v.string((*p, "device"), m.get("device"), "denylist device")
            rid = v.rule_id(p, m, f"denylist[{i}]")
        if pattern:
            v.device_pattern(p if isinstance(item, str) else (*p, "device"), pattern)
            denylist.append(DenySpec(pattern, rid, v.next_order()))

    device_types: dict[str, DeviceTypeSpec] = {}
    for name, body in v.name_map(("device_types",), top.get("device_types"), "device type").items():
        p = ("device_types", name)
        m = v.mapping(p, body or {}, _TYPE_KEYS, f"device type {name!r}")
        size = m.get("max_size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            v.report((*p, "max_size"), "schema.type", f"max_size must be a whole number of bytes >= 0, not {size!r}")
            size = None
        rid = v.rule_id(p, m, f"device_types.{name}")
        device_types[name] = DeviceTypeSpec(name, rid, v.next_order(), size)
    known_types = set(DEVICE_TYPES) | set(device_types)

    devices: list[DeviceSpec] = []
    derived = doc.derived_ids
    device_items = v.seq(("devices",), top.get("devices"), "devices")
    fast_devices = _fast_devices(device_items, known_types, vendors, derived, v.order + 1)
    if fast_devices is not None:
        devices = fast_devices
        v.order += len(devices)
        device_items = []
    for i, item in enumerate(device_items):
        # fast path: a well-formed entry (the common case, thousands of them) is taken as it is
        if (
            type(item) is dict
            and item.keys() <= _DEVICE_FAST_KEYS
            and type(pat := item.get("id")) is str
            and _DEVICE_RE.match(pat)
            and type(typ := item.get("type")) is str
            and typ in known_types
            and type(vendor := item.get("vendor")) is str
            and vendor
            and (not vendors or vendor in vendors)
            and type(maint := item.get("maintenance")) in _OPT_BOOL
        ):
            v.order += 1
            devices.append(DeviceSpec(pat, typ, vendor, maint, derived.get(("devices", i)) or f"devices[{i}]",
                                      v.order))
            continue
        p = ("devices", i)
        m = v.mapping(p, item, _DEVICE_KEYS, "a device entry")
        if not m:
            continue
        spat = v.string((*p, "id"), m.get("id"), "device id")
        styp = v.string((*p, "type"), m.get("type"), "device type")
        svendor = v.string((*p, "vendor"), m.get("vendor"), "vendor")
        smaint = m.get("maintenance")
        if smaint is not None and not isinstance(smaint, bool):
            v.report((*p, "maintenance"), "schema.type", "maintenance must be true or false")
            smaint = None
        if spat:
            v.device_pattern((*p, "id"), spat)
        if styp and styp not in known_types:
            v.warn((*p, "type"), "ref.unknown_device_type", f"device type {styp!r} is neither in the catalogue "
                   "nor under device_types", _suggest(styp, known_types) or "it gets no size limit, so it is denied")
        if svendor and vendors and svendor not in vendors:
            v.warn((*p, "vendor"), "ref.unknown_vendor", f"vendor {svendor!r} is not declared under vendors",
                   _suggest(svendor, vendors) or "an undeclared vendor has no maintenance contract")
        if spat and styp and svendor:
            devices.append(DeviceSpec(spat, styp, svendor, smaint, derived.get(p, f"devices[{i}]"), v.next_order()))

    grants: list[GrantSpec] = []
    ids = v.ids
    grant_items = v.seq(("grants",), top.get("grants"), "grants")
    fast_grants = _fast_grants(grant_items, ids, v.order + 1)
    if fast_grants is not None:
        grants = fast_grants
        v.order += len(grants)
        grant_items = []
    for i, item in enumerate(grant_items):
        p = ("grants", i)
        m = v.mapping(p, item, _GRANT_KEYS, "a grant")
        if not m:
            continue
        rid = v.rule_id(p, m, f"grants[{i}]")
        gdev = v.strings((*p, "devices"), m.get("devices"), "devices", star=True)
        for j, d in enumerate(gdev or ()):
            v.device_pattern((*p, "devices", j), d)
        gtypes = v.strings((*p, "device_types"), m.get("device_types"), "device_types", star=True)
        for j, t in enumerate(gtypes or ()):
            if t not in known_types:
                v.warn((*p, "device_types", j), "ref.unknown_device_type", f"device type {t!r} is not known",
                       _suggest(t, known_types))
        if "topics" not in m:
            v.report(p, "schema.missing_key", "a grant needs 'topics'", "e.g. topics: [site/{site}/dev/{device}/result]")
        topics = v.strings((*p, "topics"), m.get("topics"), "topics") or ()
        for j, t in enumerate(topics):
            v.topic_filter((*p, "topics", j), t)
        if "devices" not in m and "device_types" not in m:
            v.report(p, "schema.missing_key", "a grant needs 'devices' or 'device_types'",
                     "say devices: '*' to grant every registered device")
        grants.append(GrantSpec(rid, v.next_order(), gdev, None if gtypes is None else frozenset(gtypes), topics))

    dest_names = list(v.name_map(("destinations",), top.get("destinations"), "destination"))

    rules: list[RuleSpec] = []
    for i, item in enumerate(v.seq(("rules",), top.get("rules"), "rules")):
        p = ("rules", i)
        m = v.mapping(p, item, _RULE_KEYS, "a rule")
        if not m:
            continue
        rid = v.rule_id(p, m, f"rules[{i}]")
        if "effect" not in m:
            v.report(p, "schema.missing_key", "a rule needs 'effect'", "effect: permit or effect: forbid")
        effect: Literal["permit", "forbid"] = v.enum((*p, "effect"), m.get("effect"), ("permit", "forbid"),
                                                     "effect", "forbid")
        if "destinations" not in m:
            v.report(p, "schema.missing_key", "a rule needs 'destinations'", "a list of destination names, or '*'")
        dests = v.strings((*p, "destinations"), m.get("destinations"), "destinations", star=True)
        for j, d in enumerate(dests or ()):
            if d not in dest_names:
                v.warn((*p, "destinations", j), "ref.unknown_destination", f"destination {d!r} is not declared",
                       _suggest(d, dest_names) or "this part of the rule never matches")
        rcls = v.strings((*p, "classes"), m.get("classes"), "classes", star=True)
        for j, c in enumerate(rcls or ()):
            if c not in classes:
                v.warn((*p, "classes", j), "ref.unknown_class", f"data class {c!r} is not known",
                       _suggest(c, classes) or f"known classes: {', '.join(classes)}")
        rfields = v.strings((*p, "fields"), m.get("fields"), "fields", star=True)
        if effect == "permit" and "classes" not in m:
            v.report(p, "schema.missing_key", "a permit rule needs 'classes'",
                     "list the data classes it lets through, or '*' for all (never 'prohibited')")
        rules.append(RuleSpec(rid, v.next_order(), effect,
                              None if dests is None else frozenset(dests),
                              None if rcls is None else frozenset(rcls),
                              None if rfields is None else frozenset(rfields),
                              v.when((*p, "when"), m.get("when"))))

    destinations: list[DestinationSpec] = []
    for name in dest_names:
        p = ("destinations", name)
        m = v.mapping(p, top["destinations"][name] or {}, _DEST_KEYS, f"destination {name!r}")
        for req in ("jurisdiction", "transport"):
            if req not in m:
                v.report(p, "schema.missing_key", f"destination {name!r} needs {req!r}", key=True)
        jur = v.string((*p, "jurisdiction"), m.get("jurisdiction"), "jurisdiction", required=False) or ""
        transport: Literal["vault", "mqtt"] = v.enum((*p, "transport"), m.get("transport"), ("vault", "mqtt"),
                                                     "transport", "mqtt")
        trust = v.enum((*p, "trust"), m.get("trust"), TRUST_LEVELS, "trust", "untrusted")
        topic = m.get("topic")
        if topic is None:
            topic = f"edgeward/out/{name}" if transport == "mqtt" else ""
        elif not isinstance(topic, str) or "+" in topic or "#" in topic or "\x00" in topic:
            v.report((*p, "topic"), "value.topic", f"destination topic {topic!r} must be a plain topic prefix",
                     "no '+' or '#'; e.g. edgeward/out/customs_nl")
            topic = ""
        if transport == "vault" and topic:
            v.report((*p, "topic"), "value.topic", "a vault destination has no MQTT topic", "remove 'topic'")
        if transport == "mqtt" and isinstance(topic, str) and topic and not topic.startswith("edgeward/"):
            v.warn((*p, "topic"), "lint.topic_outside_gateway", f"topic {topic!r} is outside edgeward/",
                   "the rendered broker ACL lets the gateway write only under edgeward/#")
        rkey = m.get("recipient_key")
        if rkey is not None and not (isinstance(rkey, str) and rkey):
            v.report((*p, "recipient_key"), "schema.type", "recipient_key must be a file path or null")
            rkey = None
        if jur and jur not in allowed_j:
            v.warn((*p, "jurisdiction"), "lint.unreachable_destination",
                   f"jurisdiction {jur!r} is not in allowed_jurisdictions, so {name!r} never receives anything",
                   "add it to allowed_jurisdictions or remove the destination")
        obligations: list[ObligationSpec] = []
        for i, item in enumerate(v.seq((*p, "obligations"), m.get("obligations"), "obligations")):
            op = (*p, "obligations", i)
            om = v.mapping(op, item, _OBL_KEYS, "an obligation")
            if not om:
                continue
            rid = v.rule_id(op, om, f"destinations.{name}.obligations[{i}]")
            kinds = [k for k in _OBL_KINDS if k in om]
            if len(kinds) != 1:
                v.report(op, "schema.obligation", "an obligation says exactly one of remove, quantize or drop",
                         "split it into several obligations")
                continue
            kind = kinds[0]
            w = v.when((*op, "when"), om.get("when"))
            body = om[kind]
            steps: list[tuple[str, float]] = []
            ofields: frozenset[str] | None = None
            ocls: frozenset[str] | None = None
            if kind == "quantize":
                qm = body if isinstance(body, dict) else {}
                if not isinstance(body, dict) or not body:
                    v.report((*op, kind), "schema.type", "quantize maps field names to steps",
                             "e.g. quantize: {match_score: 0.05}")
                for fname, step in qm.items():
                    if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0:
                        v.report((*op, kind, fname), "value.step", f"step for {fname!r} must be a number > 0",
                                 "e.g. 0.05 rounds 0.8731 to 0.85")
                    else:
                        steps.append((str(fname), float(step)))
            else:
                if isinstance(body, (list, str)):
                    ofields = frozenset(v.strings((*op, kind), body, f"{kind} fields") or ())
                else:
                    sm = v.mapping((*op, kind), body, _SELECT_KEYS, kind)
                    fl = v.strings((*op, kind, "fields"), sm.get("fields"), "fields")
                    cl = v.strings((*op, kind, "classes"), sm.get("classes"), "classes")
                    ofields = None if fl is None else frozenset(fl)
                    ocls = None if cl is None else frozenset(cl)
                    for c in sorted(ocls or ()):
                        if c not in classes:
                            v.warn((*op, kind, "classes"), "ref.unknown_class", f"data class {c!r} is not known",
                                   _suggest(c, classes))
                    if ofields is None and ocls is None:
                        v.report((*op, kind), "schema.missing_key", f"{kind} needs fields or classes")
            obligations.append(ObligationSpec(rid, v.next_order(), name, kind, ofields, ocls,
                                              tuple(steps), w))
        destinations.append(DestinationSpec(
            name=name, jurisdiction=jur, trust=trust, transport=transport,
            topic=topic if isinstance(topic, str) else "",
            rest_at_edge=v.boolean((*p, "rest_at_edge"), m.get("rest_at_edge"), "rest_at_edge", False),
            recipient_key=rkey,
            on_disallowed_field=v.enum((*p, "on_disallowed_field"), m.get("on_disallowed_field"),
                                       ("remove", "deny"), "on_disallowed_field", mode),
            requires_contract=v.boolean((*p, "requires_contract"), m.get("requires_contract"),
                                        "requires_contract", False),
            drop_when_empty=v.boolean((*p, "drop_when_empty"), m.get("drop_when_empty"), "drop_when_empty",
                                      drop_empty),
            obligations=tuple(obligations),
            **_delivery(v, p, m, transport),
        ))

    rule_order = {b: -len(BUILTIN_RULES) + i for i, b in enumerate(BUILTIN_RULES)}
    # registry entries never decide a route, so they have no place here
    rule_order.update(map(itemgetter(1, 2), denylist))  # DenySpec: (pattern, rule_id, order)
    rule_order.update(map(itemgetter(0, 1), grants))  # GrantSpec: (rule_id, order, ...)
    for group in (device_types.values(), rules):
        rule_order.update((r.rule_id, r.order) for r in group)
    for dst in destinations:
        for o in dst.obligations:
            rule_order[o.rule_id] = o.order

    spec = PolicySpec(
        site=site, jurisdiction=jurisdiction, allowed_jurisdictions=allowed_j, require_registered=require_reg,
        data_classes=classes, vendors=vendors, device_types=device_types, devices=tuple(devices),
        denylist=tuple(denylist), grants=tuple(grants), rules=tuple(rules), destinations=tuple(destinations),
        rule_order=rule_order,
    )
    failed = any(d.severity == "error" for d in v.diags)
    done = len(v.diags)

    def lints() -> list[Diagnostic]:
        if failed:
            return []  # the lints read a consistent spec only
        from gateway.policy.lint import lint

        del v.diags[done:]  # idempotent
        lint(spec, v)
        return v.diags[done:]

    return (None if failed else spec), list(v.diags), lints


def _delivery(v: Any, p: Path, m: dict[str, Any], transport: Any) -> dict[str, Any]:
    """A destination's delivery settings: uplink re-timing, bundling and the store-and-forward spool."""
    retime = m.get("retime_ms")
    if retime is None:
        retime_ms = DEFAULT_RETIME_MS if transport == "mqtt" else 0
    elif isinstance(retime, bool) or not isinstance(retime, int) or not 0 <= retime <= 60_000:
        v.report((*p, "retime_ms"), "value.retime", "retime_ms must be a whole number of milliseconds, 0..60000",
                 "0 sends at once (device timing reaches the destination); 1000 releases once a second")
        retime_ms = DEFAULT_RETIME_MS
    else:
        retime_ms = retime
    bundle = m.get("bundle")
    if bundle is None:
        bundle = DEFAULT_BUNDLE if transport == "mqtt" else 1
    elif isinstance(bundle, bool) or not isinstance(bundle, int) or not 1 <= bundle <= MAX_BUNDLE:
        v.report((*p, "bundle"), "value.bundle", f"bundle must be a whole number of envelopes, 1..{MAX_BUNDLE}",
                 f"1 sends one envelope per MQTT message on <topic>/<device>/<stream>; {DEFAULT_BUNDLE} is the default")
        bundle = DEFAULT_BUNDLE
    elif transport != "mqtt" and bundle != 1:
        v.report((*p, "bundle"), "value.bundle_transport", "bundle applies to mqtt destinations only",
                 "remove bundle from this destination")
    spool_mb, when_full = DEFAULT_SPOOL_MB, "refuse_new"
    sp = m.get("spool")
    if sp is not None:
        sm = v.mapping((*p, "spool"), sp, _SPOOL_KEYS, "spool")
        mb = sm.get("max_mb")
        if mb is not None:
            if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not mb > 0:
                v.report((*p, "spool", "max_mb"), "value.spool_size", "spool max_mb must be a number > 0",
                         "e.g. max_mb: 512")
            else:
                spool_mb = float(mb)
        when_full = v.enum((*p, "spool", "when_full"), sm.get("when_full"), SPOOL_WHEN_FULL, "when_full",
                           "refuse_new")
        if not m.get("rest_at_edge"):
            v.report((*p, "spool"), "value.spool_without_rest",
                     "a spool needs rest_at_edge: true (this destination's data may not rest at the edge)",
                     "remove spool, or set rest_at_edge: true if the data may be kept here while it is down")
    return {"retime_ms": retime_ms, "spool_max_mb": spool_mb, "spool_when_full": when_full,
            "bundle": bundle if transport == "mqtt" else 1}
