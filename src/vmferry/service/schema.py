"""JSON Schema for the service's wire types: builders, and a validator of the subset we use.

One schema per body serves twice: :func:`validate` checks a request body against it before any
model is built (so a bad body is a 400 naming the field, never a ``KeyError``), and
:mod:`vmferry.service.openapi` publishes it in the OpenAPI 3.1 document (whose schemas are JSON
Schema 2020-12), so a client or a fuzzer sees exactly what the server checks.

The subset: ``type`` (one or a list; ``integer`` excludes booleans), ``enum``, ``minimum``,
``maximum``, ``minLength``, ``maxLength``, ``pattern``, ``items``, ``minItems``, ``maxItems``,
``properties``, ``required``, ``additionalProperties: false``.

Example:
    >>> body = obj({"vm": string(max_length=63)}, required=("vm",))
    >>> validate({"vm": "web-1"}, body)
    >>> validate({"vm": 3}, body)
    Traceback (most recent call last):
    ...
    vmferry.service.schema.SchemaError: $.vm: must be a string
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from vmferry.core.errors import ConfigError

__all__ = [
    "NAME_PATTERN",
    "Schema",
    "SchemaError",
    "array",
    "boolean",
    "enum",
    "integer",
    "nullable",
    "number",
    "obj",
    "string",
    "validate",
]

Schema = Mapping[str, Any]

# VM and host names (core.model.validate_name accepts these).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class SchemaError(ConfigError):
    """A body does not match its schema.

    Attributes:
        path: where (``$.options.bandwidth_mbps``).
        reason: what is wrong there.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def string(
    *, max_length: int = 256, min_length: int = 0, pattern: str | None = None
) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "maxLength": max_length}
    if min_length:
        schema["minLength"] = min_length
    if pattern is not None:
        schema["pattern"] = pattern
    return schema


def integer(minimum: int | None = None, maximum: int | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    return schema


def number(minimum: float | None = None, maximum: float | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "number"}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    return schema


def boolean() -> dict[str, Any]:
    return {"type": "boolean"}


def enum(values: Sequence[str]) -> dict[str, Any]:
    return {"type": "string", "enum": list(values)}


def array(items: Schema, *, max_items: int = 1000, min_items: int = 0) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "array", "items": dict(items), "maxItems": max_items}
    if min_items:
        schema["minItems"] = min_items
    return schema


def nullable(schema: Schema) -> dict[str, Any]:
    """``schema`` or null (JSON Schema 2020-12 spells it as a list of types)."""
    kind = schema.get("type")
    types = list(kind) if isinstance(kind, list) else [kind]
    widened = {**schema, "type": [*types, "null"]}
    if "enum" in widened:
        widened["enum"] = [*widened["enum"], None]
    return widened


def obj(
    properties: Mapping[str, Schema],
    *,
    required: Sequence[str] = (),
    closed: bool = True,
    description: str | None = None,
) -> dict[str, Any]:
    """An object with ``properties``; ``closed``: no other keys allowed (request bodies)."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {k: dict(v) for k, v in properties.items()},
    }
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    if description is not None:
        schema["description"] = description
    return schema


_TYPE_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "object": "an object",
    "array": "an array",
    "null": "null",
}


def _is_type(value: object, kind: str) -> bool:
    match kind:
        case "string":
            return isinstance(value, str)
        case "integer":
            return isinstance(value, int) and not isinstance(value, bool)
        case "number":
            return (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            )
        case "boolean":
            return isinstance(value, bool)
        case "object":
            return isinstance(value, dict)
        case "array":
            return isinstance(value, list)
        case "null":
            return value is None
    raise ValueError(f"schema type {kind!r} is not supported")


def validate(value: object, schema: Schema, path: str = "$") -> None:
    """Check ``value`` (parsed JSON) against ``schema``.

    Raises:
        SchemaError: the first mismatch, with where it is.
    """
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_is_type(value, k) for k in kinds):
            raise SchemaError(path, "must be " + " or ".join(_TYPE_NAMES[k] for k in kinds))
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join("null" if v is None else str(v) for v in schema["enum"])
        raise SchemaError(path, f"must be one of {allowed}")
    if isinstance(value, str):
        _check_string(value, schema, path)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        _check_number(value, schema, path)
    elif isinstance(value, list):
        _check_array(value, schema, path)
    elif isinstance(value, dict):
        _check_object(value, schema, path)


def _check_string(value: str, schema: Schema, path: str) -> None:
    if len(value) > schema.get("maxLength", math.inf):
        raise SchemaError(path, f"must be at most {schema['maxLength']} characters")
    if len(value) < schema.get("minLength", 0):
        raise SchemaError(path, f"must be at least {schema['minLength']} characters")
    pattern = schema.get("pattern")
    if pattern is not None and re.search(pattern, value) is None:
        raise SchemaError(path, f"must match {pattern}")


def _check_number(value: float, schema: Schema, path: str) -> None:
    if not math.isfinite(value):
        raise SchemaError(path, "must be a finite number")
    if "minimum" in schema and value < schema["minimum"]:
        raise SchemaError(path, f"must be >= {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        raise SchemaError(path, f"must be <= {schema['maximum']}")


def _check_array(value: list[object], schema: Schema, path: str) -> None:
    if len(value) > schema.get("maxItems", math.inf):
        raise SchemaError(path, f"must have at most {schema['maxItems']} items")
    if len(value) < schema.get("minItems", 0):
        raise SchemaError(path, f"must have at least {schema['minItems']} items")
    items = schema.get("items")
    if items is not None:
        for index, item in enumerate(value):
            validate(item, items, f"{path}[{index}]")


def _check_object(value: dict[Any, object], schema: Schema, path: str) -> None:
    properties: Mapping[str, Schema] = schema.get("properties", {})
    for key in schema.get("required", ()):
        if key not in value:
            raise SchemaError(f"{path}.{key}", "is required")
    if schema.get("additionalProperties") is False:
        extra = sorted(str(k) for k in value if k not in properties)
        if extra:
            raise SchemaError(path, f"unknown field(s): {', '.join(extra)}")
    for key, item in value.items():
        if key in properties:
            validate(item, properties[key], f"{path}.{key}")
