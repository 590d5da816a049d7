"""The OpenAPI 3.1 document, generated from the request schemas, and a self-contained rendered reference."""
from __future__ import annotations

import html
from typing import Any

from flask import Blueprint, current_app, jsonify
from pydantic import TypeAdapter

from jobs.models import JOB_TYPES
from jobs.states import STATUSES

from jobs.models import FILE_PURPOSES
from jobs.specs import JobSpec as JobRequest

openapi = Blueprint("openapi", __name__)

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "param"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "param": {"type": ["string", "null"]},
            },
        }
    },
}


def query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema or {"type": "string"}}


def multipart(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "properties": properties, "required": required}}}}


LIMIT = query("limit", "Page size, 1 to 100 (default 20).", {"type": "integer", "minimum": 1, "maximum": 100})
AFTER_ID = query("after", "The last id of the previous page (its last_id).")
AFTER_INT = query("after", "The last id of the previous page (its last_id).", {"type": "integer"})
BINARY = {"type": "string", "format": "binary"}

#: What the url_map cannot tell: bodies, query parameters and success codes, by endpoint.
OPERATIONS: dict[str, dict[str, Any]] = {
    "files.upload_file": {"status": "201", "requestBody": multipart(
        {"file": BINARY, "purpose": {"type": "string", "enum": list(FILE_PURPOSES)}}, ["file", "purpose"])},
    "files.list_files": {"parameters": [query("purpose", "Only files with this purpose.",
                                              {"type": "string", "enum": list(FILE_PURPOSES)}), AFTER_ID, LIMIT]},
    "jobs.submit_job": {
        "status": "202",
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/JobRequest"}}}},
        "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False, "schema": {
            "type": "string", "maxLength": 255}, "description": "A retry with the same key and body returns the "
                                                                 "original job; a different body is a 409."}],
    },
    "jobs.list_jobs": {"parameters": [
        query("type", "Only jobs of this type.", {"type": "string", "enum": list(JOB_TYPES)}),
        query("status", "Only jobs in this status.", {"type": "string", "enum": list(STATUSES)}),
        AFTER_ID, LIMIT]},
    "jobs.list_events": {"parameters": [AFTER_INT, LIMIT]},
    "jobs.list_results": {"parameters": [AFTER_INT, LIMIT]},
    "models.list_models": {"parameters": [AFTER_ID, LIMIT]},
    "models.import_model": {"status": "201", "requestBody": multipart(
        {"file": BINARY, "name": {"type": "string", "maxLength": 255}}, ["file"])},
}


def operation(endpoint: str, method: str, summary: str, path_arguments: list[str]) -> dict[str, Any]:
    extra = OPERATIONS.get(endpoint, {})
    spec: dict[str, Any] = {
        "operationId": f"{endpoint}.{method}",
        "summary": summary,
        "parameters": [{"name": arg, "in": "path", "required": True, "schema": {"type": "string"}}
                       for arg in path_arguments] + extra.get("parameters", []),
        "responses": {
            extra.get("status", "200"): {"description": "Success"},
            "default": {
                "description": "Error",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
        },
    }
    if "requestBody" in extra:
        spec["requestBody"] = extra["requestBody"]
    return spec


def document() -> dict[str, Any]:
    components = {"Error": ERROR_SCHEMA}
    job_request = TypeAdapter(JobRequest).json_schema(ref_template="#/components/schemas/{model}")
    components.update(job_request.pop("$defs", {}))
    components["JobRequest"] = job_request
    paths: dict[str, Any] = {}
    for rule in current_app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        view = current_app.view_functions[rule.endpoint]
        path = rule.rule.replace("<", "{").replace(">", "}")
        summary = (view.__doc__ or rule.endpoint).strip().splitlines()[0]
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            spec = operation(rule.endpoint, method.lower(), summary, sorted(rule.arguments))
            if not rule.rule.startswith("/v1/"):
                spec["security"] = []
            paths.setdefault(path, {})[method.lower()] = spec
    return {
        "openapi": "3.1.0",
        "info": {"title": "gpt2-jobs", "version": "1", "description": "Train, fine-tune and bulk-generate with GPT-2."},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


@openapi.get("/openapi.json")
def openapi_json():
    """The OpenAPI 3 document."""
    return jsonify(document())


@openapi.get("/docs")
def docs():
    """A rendered API reference."""
    spec = document()
    rows = []
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            rows.append(
                f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}</code></td>"
                f"<td>{html.escape(op['summary'])}</td></tr>"
            )
    schemas = "".join(
        f"<h3 id='{html.escape(name)}'>{html.escape(name)}</h3><pre>{html.escape(_describe(schema))}</pre>"
        for name, schema in spec["components"]["schemas"].items()
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>gpt2-jobs API</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto}"
        "td{padding:.2rem .8rem;border-bottom:1px solid #ddd}pre{background:#f6f6f6;padding:.6rem}</style>"
        "</head><body><h1>gpt2-jobs API</h1><p>Authenticate with <code>Authorization: Bearer &lt;key&gt;</code>. "
        "Machine-readable: <a href='/openapi.json'>/openapi.json</a>.</p>"
        f"<h2>Routes</h2><table>{''.join(rows)}</table><h2>Schemas</h2>{schemas}</body></html>"
    )
    return page, 200, {"Content-Type": "text/html; charset=utf-8"}


def _describe(schema: dict[str, Any]) -> str:
    lines = []
    for name, prop in schema.get("properties", {}).items():
        required = "required" if name in schema.get("required", []) else "optional"
        kind = prop.get("type") or prop.get("$ref", "").rsplit("/", 1)[-1] or "any"
        extra = f" default {prop['default']!r}" if "default" in prop else ""
        lines.append(f"{name}: {kind} ({required}){extra}. {prop.get('description', '')}".rstrip(". ") )
    return "\n".join(lines) or schema.get("description", "")
