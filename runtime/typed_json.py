"""JSON documents read into frozen dataclasses, checked field by field, and back.

One mechanism for every JSON contract cytoedge owns (``bundle.json``'s sections,
the head kinds' own keys, ``result.json``): the dataclass is the schema. Reading
checks each field's type from its annotation and refuses unknown keys, naming
the key; a dataclass with an ``extra`` field keeps unknown keys there instead.
A field whose metadata sets ``OMIT_NONE`` is left out of the document while it is
None, for a key that a contract says is absent rather than null.
``json_schema`` turns the same dataclass into a JSON Schema for integrators.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

CATCH_ALL = "extra"  # a field of this name keeps the keys its dataclass does not name
OMIT_NONE = "omit_none"  # field metadata: written only when it is not None


class SpecError(ValueError):
    """A JSON value that does not match its typed spec; one line naming the key."""


def parse_section(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a JSON object, checking every field's type.

    After construction its ``validate(where)`` method, if any, runs the checks
    that types alone cannot express.
    """
    if not isinstance(data, dict):
        raise SpecError(f"{where or 'document'} must be an object")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    known = [name for name in fields if name != CATCH_ALL]
    unknown = sorted(set(data) - set(known))
    if unknown and CATCH_ALL not in fields:
        raise SpecError(f"{where or 'document'}: unknown key(s) {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for name in known:
        spec = fields[name]
        if name in data:
            values[name] = _convert(data[name], hints[name], _key(where, name))
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise SpecError(f"{_key(where, name)} is missing")
    if CATCH_ALL in fields:
        values[CATCH_ALL] = {key: data[key] for key in unknown}
    try:
        instance = cls(**values)
    except TypeError as exc:
        raise SpecError(f"{where}: {exc}") from None
    validate = getattr(instance, "validate", None)
    if validate is not None:
        validate(where)
    return instance


def dump(value: Any) -> Any:
    """The JSON value of a dataclass (``extra`` keys merged back in), tuple, dict or scalar."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data: dict[str, Any] = {}
        for item in dataclasses.fields(value):
            if item.name == CATCH_ALL:
                data.update(dump(getattr(value, item.name)))
            elif item.metadata.get(OMIT_NONE) and getattr(value, item.name) is None:
                continue
            else:
                data[item.name] = dump(getattr(value, item.name))
        return data
    if isinstance(value, tuple | list):
        return [dump(v) for v in value]
    if isinstance(value, dict):
        return {k: dump(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def finite(value: Any) -> Any:
    """A JSON value with each NaN or infinity as null: JSON has none, and an undefined
    figure (the precision of a class never called) is no number."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def json_schema(cls: type, title: str, description: str = "") -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) of dataclass ``cls`` and the dataclasses it holds."""
    definitions: dict[str, Any] = {}
    root = _object_schema(cls, definitions)
    schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **root,
        "title": title,
        **({"description": description} if description else {}),
    }
    if definitions:
        schema["$defs"] = dict(sorted(definitions.items()))
    return schema


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = (a for a in args if a is not type(None))
        return _convert(value, inner, where)
    if origin is typing.Literal:
        if value in args:
            return value
        raise SpecError(f"{where} must be one of {', '.join(map(str, args))}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        return parse_section(typing.cast(type, hint), value, where)
    if hint is Path and isinstance(value, str):
        return Path(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, list):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(
                    _convert(v, a, f"{where}[{i}]")
                    for i, (v, a) in enumerate(zip(value, args, strict=True))
                )
    elif origin is dict and isinstance(value, dict):
        return {str(k): _convert(v, args[1], _key(where, str(k))) for k, v in value.items()}
    raise SpecError(f"{where} must be {_describe(hint)}, got {json.dumps(value)[:60]}")


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} {_describe(args[0])}"
    if origin is dict:
        return f"an object of {_describe(args[1])}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, "an object")


def _object_schema(cls: type, definitions: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for item in dataclasses.fields(cls):
        if item.name == CATCH_ALL:
            continue
        hint = hints[item.name]
        if item.metadata.get(OMIT_NONE):  # absent, never null
            (hint,) = (a for a in typing.get_args(hint) if a is not type(None))
        properties[item.name] = _type_schema(hint, definitions)
        comment = item.metadata.get("doc")
        if comment:
            properties[item.name]["description"] = comment
        if item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING:
            required.append(item.name)
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    schema["additionalProperties"] = any(f.name == CATCH_ALL for f in dataclasses.fields(cls))
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    if doc:
        schema["description"] = " ".join(doc.split())
    return schema


def _type_schema(hint: Any, definitions: dict[str, Any]) -> dict[str, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return {}
    if origin in (types.UnionType, typing.Union):
        options = [_type_schema(a, definitions) for a in args if a is not type(None)]
        if type(None) in args:
            options.append({"type": "null"})
        return options[0] if len(options) == 1 else {"anyOf": options}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if dataclasses.is_dataclass(hint):
        name = hint.__name__
        if name not in definitions:
            definitions[name] = {}  # a placeholder stops recursion through itself
            definitions[name] = _object_schema(hint, definitions)
        return {"$ref": f"#/$defs/{name}"}
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _type_schema(args[0], definitions)}
        return {
            "type": "array",
            "prefixItems": [_type_schema(a, definitions) for a in args],
            "minItems": len(args),
            "maxItems": len(args),
        }
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1], definitions)}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string", Path: "string"}
    if hint in simple:
        return {"type": simple[hint]}
    raise TypeError(f"no JSON Schema for {hint!r}")
