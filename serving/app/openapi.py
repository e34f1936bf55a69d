"""OpenAPI documentation for routes that read their bodies raw, so they can bound the size."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its ``$defs`` inlined (OpenAPI resolves refs from its root)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return inline(schema)


def json_body(model: type[BaseModel], *, binary: bool = False) -> dict[str, Any]:
    """``openapi_extra`` documenting a body that a route reads raw (to bound its size)."""
    content = {"application/json": {"schema": _schema(model)}}
    if binary:  # the binary tensor extension: JSON, then tensor bytes
        content["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


def json_answer(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """``responses`` documenting a JSON answer and the errors every route may give."""
    error = {"content": {"application/json": {"schema": _schema(_ErrorBody)}}}
    return {
        200: {"content": {"application/json": {"schema": _schema(model)}}},
        **{code: error | {"description": why} for code, why in _ERRORS.items()},
    }


class _ErrorBody(BaseModel):
    error: str


_ERRORS = {
    400: "Bad input: the message names the problem",
    404: "Unknown model or version",
    413: "Body over the size limit",
    422: "A native request body that does not match the schema",
    503: "Queue full: retry after the Retry-After header's seconds",
}
