"""Breaking changes between two OpenAPI 3.1 documents, for the operations ``/v1`` clients rely
on: every ``/v1/…`` path and ``/oauth/token``.

A change is breaking when a client written against ``old`` may fail against ``new``:

- an operation (a path, or one method of it) removed;
- a parameter removed; one that becomes required, or a new required one; the same for a
  request-body property, and a request body that becomes required;
- a type change: a request value's type that is no longer accepted (``integer`` → ``string``;
  ``string`` → ``string | null`` is not breaking), a response value that may come in a type it
  did not (``string`` → ``string | null`` is);
- an enum value removed from a parameter or request schema, or a value newly restricted to an
  enum; an enum value added to a response schema (a client may not handle it), or a response
  enum lifted;
- a response status removed, a response media type removed, a response property removed or no
  longer always present; a request media type no longer accepted;
- a request property removed where the new schema refuses unknown ones.

``$ref``s are followed into the document's components (recursive schemas are compared once).
Additions — a new path, operation, optional parameter or property, response status — are not
breaking. Each message names the operation and the thing: ``GET /v1/x: query parameter
'metric': enum value "ggr" removed``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any, Literal

Document = Mapping[str, Any]
Schema = Mapping[str, Any]
Direction = Literal["request", "response"]

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string",
              type(None): "null", list: "array", dict: "object"}


def in_scope(path: str) -> bool:
    """The paths whose operations a ``/v1`` client relies on."""
    return path.startswith("/v1/") or path == "/oauth/token"


def operations(document: Document) -> Iterator[tuple[str, str, Mapping[str, Any]]]:
    """``(path, method, operation)`` for every operation of ``document``."""
    for path, item in document.get("paths", {}).items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def breaking_changes(old: Document, new: Document) -> list[str]:
    """The breaking changes from ``old`` to ``new`` in the ``/v1`` operations, one message
    each, in path order."""
    found: dict[str, None] = {}  # ordered, without repeats
    new_paths = new.get("paths", {})
    for path, method, old_op in sorted(operations(old), key=lambda o: (o[0], o[1])):
        if not in_scope(path):
            continue
        name = f"{method.upper()} {path}"
        new_op = new_paths.get(path, {}).get(method)
        if new_op is None:
            gone = "the path is gone" if path not in new_paths else f"no {method.upper()} on it"
            found[f"{name}: operation removed ({gone})"] = None
            continue
        _Operation(old, new, name, found).compare(
            old["paths"][path], old_op, new_paths[path], new_op)
    return list(found)


def _deref(document: Document, node: Any) -> tuple[Mapping[str, Any], str | None]:
    """``node`` with its ``$ref`` chain followed (siblings of a ``$ref`` kept), and the last
    reference; an external or dangling reference is an unknown (empty) schema."""
    ref = None
    seen: set[str] = set()
    while isinstance(node, Mapping) and isinstance(node.get("$ref"), str):
        ref = node["$ref"]
        if ref in seen or not ref.startswith("#/"):
            return {}, ref
        seen.add(ref)
        target: Any = document
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, Mapping) else None
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        node = {**target, **siblings} if isinstance(target, Mapping) else siblings
    return (node if isinstance(node, Mapping) else {}), ref


def _members(schema: Schema) -> list[Any]:
    return [*schema.get("anyOf", ()), *schema.get("oneOf", ())]


def _json_type(value: Any) -> str:
    return JSON_TYPES.get(type(value), "object")


def _covers(accepted: set[str], types: set[str]) -> bool:
    return all(t in accepted or (t == "integer" and "number" in accepted) for t in types)


def _fmt_types(types: set[str] | None) -> str:
    return "any" if types is None else " | ".join(sorted(types)) or "nothing"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class _Operation:
    """Compares one operation of ``old`` with the same one of ``new``."""

    def __init__(self, old: Document, new: Document, name: str,
                 found: dict[str, None]) -> None:
        self.old, self.new, self.name, self.found = old, new, name, found

    def add(self, message: str) -> None:
        self.found[f"{self.name}: {message}"] = None

    def compare(self, old_item: Mapping[str, Any], old_op: Mapping[str, Any],
                new_item: Mapping[str, Any], new_op: Mapping[str, Any]) -> None:
        self.parameters(self._parameters(self.old, old_item, old_op),
                        self._parameters(self.new, new_item, new_op))
        self.request_body(_deref(self.old, old_op.get("requestBody"))[0] or None,
                          _deref(self.new, new_op.get("requestBody"))[0] or None)
        self.responses(old_op.get("responses", {}), new_op.get("responses", {}))

    # ---------------------------------------------------------------- parameters and bodies

    @staticmethod
    def _parameters(document: Document, item: Mapping[str, Any],
                    op: Mapping[str, Any]) -> dict[tuple[str, str], Mapping[str, Any]]:
        """The operation's parameters by (in, name): the path item's, overridden by its own;
        header names are case-insensitive."""
        found = {}
        for raw in (*item.get("parameters", ()), *op.get("parameters", ())):
            parameter = _deref(document, raw)[0]
            where, name = parameter.get("in", "query"), str(parameter.get("name", ""))
            found[(where, name.lower() if where == "header" else name)] = parameter
        return found

    def parameters(self, old: Mapping[tuple[str, str], Mapping[str, Any]],
                   new: Mapping[tuple[str, str], Mapping[str, Any]]) -> None:
        for (where, name), before in old.items():
            label = f"{where} parameter '{name}'"
            after = new.get((where, name))
            if after is None:
                self.add(f"{label} removed")
                continue
            if after.get("required") and not before.get("required"):
                self.add(f"{label} becomes required")
            self.schema(before.get("schema", {}), after.get("schema", {}), label, "",
                        "request", parameter=True)
        for (where, name), after in new.items():
            if (where, name) not in old and after.get("required"):
                self.add(f"new required {where} parameter '{name}'")

    def request_body(self, old: Mapping[str, Any] | None,
                     new: Mapping[str, Any] | None) -> None:
        if new is not None and new.get("required") and not (old and old.get("required")):
            self.add("request body becomes required" if old else "new required request body")
        if old is None or new is None:
            return
        for media, before in old.get("content", {}).items():
            after = new.get("content", {}).get(media)
            if after is None:
                self.add(f"request body {media} no longer accepted")
                continue
            self.schema(before.get("schema", {}), after.get("schema", {}),
                        f"request body ({media})", "", "request")

    def responses(self, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        for status, raw in old.items():
            if status not in new:
                self.add(f"response {status} removed")
                continue
            before, after = _deref(self.old, raw)[0], _deref(self.new, new[status])[0]
            for media, content in before.get("content", {}).items():
                other = after.get("content", {}).get(media)
                if other is None:
                    self.add(f"response {status}: {media} removed")
                    continue
                self.schema(content.get("schema", {}), other.get("schema", {}),
                            f"response {status} ({media})", "", "response")

    # ---------------------------------------------------------------- schemas

    def schema(self, old_raw: Any, new_raw: Any, base: str, path: str, direction: Direction,
               parameter: bool = False,
               seen: frozenset[tuple[str, str]] = frozenset()) -> None:
        """Compares the schema at ``path`` (a property path, ``''`` for the top) of ``base``
        (a parameter, a request body, a response)."""
        old, old_ref = _deref(self.old, old_raw)
        new, new_ref = _deref(self.new, new_raw)
        old_ref = old_ref or self._optional_ref(self.old, old)
        new_ref = new_ref or self._optional_ref(self.new, new)
        if old_ref and new_ref:
            if (old_ref, new_ref) in seen:
                return  # a recursive schema: compared already on this path
            seen = seen | {(old_ref, new_ref)}
        label = f"{base}, property '{path}'" if path else base
        self._types(old, new, label, direction, parameter)
        self._enums(old, new, label, direction, parameter)
        self._properties(old, new, base, path, direction, seen)
        old_items, new_items = self._unwrap(self.old, old), self._unwrap(self.new, new)
        if "items" in old_items and "items" in new_items:
            self.schema(old_items["items"], new_items["items"], base, f"{path}[]", direction,
                        seen=seen)
        old_extra = old_items.get("additionalProperties")
        new_extra = new_items.get("additionalProperties")
        if isinstance(old_extra, Mapping) and isinstance(new_extra, Mapping):
            self.schema(old_extra, new_extra, base, _join(path, "*"), direction, seen=seen)
        for old_member, new_member in self._paired_members(old, new):
            self.schema(old_member, new_member, base, path, direction, parameter, seen)

    def _types(self, old: Schema, new: Schema, label: str, direction: Direction,
               parameter: bool) -> None:
        before, after = self.types(self.old, old), self.types(self.new, new)
        if parameter:  # a parameter is absent or a value: "null" is not something to send
            before = None if before is None else before - {"null"} or None
            after = None if after is None else after - {"null"} or None
        if direction == "request":  # breaking: a value old accepted that new refuses
            broken = after is not None and (before is None or not _covers(after, before))
        else:  # breaking: a value new may send that old never did
            broken = before is not None and (after is None or not _covers(before, after))
        if broken:
            self.add(f"{label}: type changed from {_fmt_types(before)} to {_fmt_types(after)}")

    def types(self, document: Document, schema: Schema) -> set[str] | None:
        """The JSON types ``schema`` admits, ``None`` for any."""
        schema = _deref(document, schema)[0]
        if "type" in schema:
            declared = schema["type"]
            return {declared} if isinstance(declared, str) else set(declared)
        if "const" in schema:
            return {_json_type(schema["const"])}
        if "enum" in schema:
            return {_json_type(v) for v in schema["enum"]}
        members = _members(schema)
        if members:
            found: set[str] = set()
            for member in members:
                types = self.types(document, member)
                if types is None:
                    return None
                found |= types
            return found
        for member in schema.get("allOf", ()):
            types = self.types(document, member)
            if types is not None:
                return types
        return None

    def _enums(self, old: Schema, new: Schema, label: str, direction: Direction,
               parameter: bool) -> None:
        before, after = self.values(self.old, old), self.values(self.new, new)
        if parameter:
            before = None if before is None else before - {"null"}
            after = None if after is None else after - {"null"}
        if direction == "request":
            if before is None and after is not None:
                self.add(f"{label}: now restricted to {', '.join(sorted(after))}")
            elif before is not None and after is not None:
                for value in sorted(before - after):
                    self.add(f"{label}: enum value {value} removed")
        elif before is not None:
            if after is None:
                self.add(f"{label}: no longer an enum (any value may come)")
            else:
                for value in sorted(after - before):
                    self.add(f"{label}: enum value {value} added")

    def values(self, document: Document, schema: Schema) -> set[str] | None:
        """The values ``schema`` is restricted to (as JSON text), ``None`` for no enum."""
        schema = _deref(document, schema)[0]
        if "enum" in schema:
            return {json.dumps(v) for v in schema["enum"]}
        if "const" in schema:
            return {json.dumps(schema["const"])}
        members = _members(schema)
        if members:
            found: set[str] = set()
            for member in members:
                if self.types(document, member) == {"null"}:
                    found.add("null")
                    continue
                values = self.values(document, member)
                if values is None:
                    return None
                found |= values
            return found
        for member in schema.get("allOf", ()):
            values = self.values(document, member)
            if values is not None:
                return values
        return None

    def _optional_ref(self, document: Document, schema: Schema) -> str | None:
        """The reference of an optional value's one member that is not ``null``."""
        members = [m for m in _members(schema) if self.types(document, m) != {"null"}]
        return _deref(document, members[0])[1] if len(members) == 1 else None

    def _unwrap(self, document: Document, schema: Schema) -> Mapping[str, Any]:
        """``schema`` itself, or the one member of an ``anyOf``/``oneOf`` that is not
        ``null`` (an optional value), with ``allOf`` members merged in."""
        schema = _deref(document, schema)[0]
        members = [m for m in _members(schema) if self.types(document, m) != {"null"}]
        if len(members) == 1:
            schema = _deref(document, members[0])[0]
        merged: dict[str, Any] = {}
        for member in schema.get("allOf", ()):
            part = self._unwrap(document, member)
            merged.update(part)
            merged["properties"] = {**merged.get("properties", {}),
                                    **part.get("properties", {})}
            merged["required"] = [*merged.get("required", ()), *part.get("required", ())]
        if not merged:
            return schema
        return {**merged, **{k: v for k, v in schema.items() if k != "allOf"},
                "properties": {**merged["properties"], **schema.get("properties", {})},
                "required": [*merged["required"], *schema.get("required", ())]}

    def _properties(self, old_raw: Schema, new_raw: Schema, base: str, path: str,
                    direction: Direction, seen: frozenset[tuple[str, str]]) -> None:
        old, new = self._unwrap(self.old, old_raw), self._unwrap(self.new, new_raw)
        old_props, new_props = old.get("properties", {}), new.get("properties", {})
        old_required, new_required = set(old.get("required", ())), set(new.get("required", ()))
        if direction == "request":
            for name in sorted(new_required - old_required):
                if name in old_props:
                    self.add(f"{base}: property '{_join(path, name)}' becomes required")
                else:
                    self.add(f"{base}: new required property '{_join(path, name)}'")
            if new.get("additionalProperties") is False:
                for name in sorted(set(old_props) - set(new_props)):
                    self.add(f"{base}: property '{_join(path, name)}' removed (no longer "
                             "accepted)")
        else:
            for name in sorted(set(old_props) - set(new_props)):
                self.add(f"{base}: property '{_join(path, name)}' removed")
            for name in sorted((old_required - new_required) & set(new_props)):
                self.add(f"{base}: property '{_join(path, name)}' no longer always present")
        for name in old_props:
            if name in new_props:
                self.schema(old_props[name], new_props[name], base, _join(path, name),
                            direction, seen=seen)

    def _paired_members(self, old: Schema, new: Schema) -> Iterator[tuple[Any, Any]]:
        """The alternatives of two ``anyOf``/``oneOf`` schemas that are the same one: by
        component name, or by position when neither names its members (an optional value's
        one member is compared through :meth:`_unwrap` instead)."""
        olds = [m for m in _members(old) if self.types(self.old, m) != {"null"}]
        news = [m for m in _members(new) if self.types(self.new, m) != {"null"}]
        if len(olds) <= 1 and len(news) <= 1:
            return
        old_refs = {_deref(self.old, m)[1]: m for m in olds}
        new_refs = {_deref(self.new, m)[1]: m for m in news}
        if None not in old_refs and None not in new_refs:
            for ref, member in old_refs.items():
                if ref in new_refs:
                    yield member, new_refs[ref]
        elif len(olds) == len(news):
            yield from zip(olds, news, strict=True)
