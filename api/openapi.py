"""The OpenAPI 3.1 document, generated from the request schemas, and a self-contained rendered reference."""
from __future__ import annotations

import html
from typing import Any

from flask import Blueprint, current_app, jsonify
from pydantic import TypeAdapter

from .schemas import JobRequest

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
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            summary = (view.__doc__ or rule.endpoint).strip().splitlines()[0]
            paths.setdefault(path, {})[method.lower()] = {
                "operationId": f"{rule.endpoint}.{method.lower()}",
                "summary": summary,
                "parameters": [
                    {"name": arg, "in": "path", "required": True, "schema": {"type": "string"}}
                    for arg in sorted(rule.arguments)
                ],
                "responses": {
                    "200": {"description": "Success"},
                    "default": {
                        "description": "Error",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                    },
                },
            }
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
