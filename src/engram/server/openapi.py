"""The HTTP API described as OpenAPI 3.1, served at ``GET /openapi.json`` without auth.

It describes every route ``routes.EngramApp`` dispatches, and nothing else
(tests/integration/test_openapi.py walks the app's route tables and checks both ways, and
validates the document with openapi-spec-validator). A route added to the app without a
description here fails that test.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from engram import __version__
from engram.format.stream import CONTENT_TYPE as BACKUP_STREAM_TYPE
from engram.planner import OP_NAMES

_JSON = "application/json"
_ERROR_REF = {"$ref": "#/components/schemas/Error"}
_ID = {"type": "string", "minLength": 1, "maxLength": 256, "pattern": "^[A-Za-z0-9_.:@/-]+$"}
_LSN = {"type": "integer", "minimum": 0, "description": "The log sequence number of the write."}
_TIME_NS = {
    "type": "integer",
    "minimum": 0,
    "description": "UTC nanoseconds since the epoch (0 = never); not later than the write.",
}


def _obj(props: dict[str, Any], required: tuple[str, ...] = (), extra: bool = False) -> Any:
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = list(required)
    if not extra:
        out["additionalProperties"] = False
    return out


def _json(schema: Any, description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ERROR_REF, description)


def _body(schema: Any, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {_JSON: {"schema": schema}}}


def _query(name: str, schema: Any, description: str, required: bool = False) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "schema": schema,
        "description": description,
    }


_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": _ID,
    "description": "The memory's id; percent-encode '/' as %2F.",
}

_MEMORY = _obj(
    {
        "id": _ID,
        "content": {"type": "string"},
        "strength": {"type": "number", "minimum": 0, "maximum": 1},
        "metadata": {"type": "object"},
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
        "last_activated_at": {"type": ["string", "null"], "format": "date-time"},
        "activation_count": {"type": "integer", "minimum": 0},
        "effective_strength": {"type": "number", "description": "Strength decayed to now."},
    },
    ("id", "content", "strength", "metadata", "created_at", "updated_at"),
    extra=True,
)
_EDGE = _obj(
    {
        "src": _ID,
        "dst": _ID,
        "kind": {"type": "string"},
        "weight": {"type": "number"},
        "created_at": {"type": "string", "format": "date-time"},
    },
    ("src", "dst", "kind", "weight"),
    extra=True,
)
_CREATE_MEMORY = _obj(
    {
        "id": _ID,
        "content": {"type": "string"},
        "strength": {"type": "number", "minimum": 0, "maximum": 1},
        "metadata": {"type": "object"},
        "created_at": _TIME_NS,
        "updated_at": _TIME_NS,
        "last_activated_at": _TIME_NS,
        "activation_count": {"type": "integer", "minimum": 0},
    },
    ("content",),
)
_CREATE_EDGE = _obj(
    {
        "src": _ID,
        "dst": _ID,
        "kind": {"type": "string", "default": "related"},
        "weight": {"type": "number"},
        "created_at": _TIME_NS,
    },
    ("src", "dst"),
)
_EDGE_DONE = _obj({"src": _ID, "dst": _ID, "kind": {"type": "string"}, "lsn": _LSN}, extra=True)
_OP = {
    "type": "object",
    "required": ["op"],
    "properties": {
        "op": {"enum": list(OP_NAMES)}
    },
    "description": "One op: `op` and the fields of its route's body (an export's lines are "
    "create_memory and create_edge ops).",
}
_HEALTH = _obj(
    {
        "status": {"type": "string"},
        "reason": {"type": "string"},
        "replayed": {"type": "integer"},
        "lsn": {"type": "integer"},
        # A restored data dir whose digest check runs while the server serves.
        "verification": _obj(
            {
                "state": {"type": "string", "enum": ["pending", "verifying", "verified", "failed"]},
                "lsn": {"type": ["integer", "null"]},
                "backup": {"type": ["string", "null"]},
                "reason": {"type": ["string", "null"]},
                "seconds": {"type": ["number", "null"]},
            },
            ("state",),
        ),
    },
    ("status",),
)

_BAD = {
    "400": _error("Bad input: the field named in `field` is missing, unknown or out of range."),
}
_AUTH = {"401": _error("No valid bearer token.")}
_UNAVAILABLE = {
    "503": _error(
        "Starting (recovery in progress), failed to open, quiesced, or (writes) the restored "
        "data failed its digest check: `verification_failed`."
    )
}
_WRITE_ERRORS = {
    **_BAD,
    **_AUTH,
    "404": _error("A memory the write needs does not exist."),
    "409": _error("It already exists, or the write is refused because of the state."),
    "413": _error("The body is larger than the server's limit."),
    "507": _error("The server's disk is full."),
    **_UNAVAILABLE,
}
_READ_ERRORS = {**_BAD, **_AUTH, **_UNAVAILABLE}


def _op(
    summary: str,
    responses: dict[str, Any],
    *,
    tag: str = "data",
    params: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if params:
        out["parameters"] = params
    if body is not None:
        out["requestBody"] = body
    if tag == "health":
        out["security"] = []  # no auth
    elif tag == "admin":
        out["security"] = [{"adminToken": []}]
    return out


def _paths() -> dict[str, Any]:
    wrote = _obj({"id": _ID, "lsn": _LSN}, ("id", "lsn"), extra=True)
    backup_body = _obj(
        {
            "kind": {"enum": ["full", "incremental"]},
            "compression": {"enum": ["zstd", "gzip"]},
            "since_s": {"type": "number", "exclusiveMinimum": 0},
            "since_lsn": {"type": "integer", "minimum": 1},
            "start_by_lsn": {"type": "integer", "minimum": 1},
            "parent": {"type": "string"},
            "priority": {"enum": ["low", "normal"]},
            "cpu_share": {"type": "number", "minimum": 0.05, "maximum": 1},
            "output": {
                "type": "string",
                "description": "A new file inside one of the server's --backup-dir; without "
                "it the backup is streamed in the response.",
            },
        },
        ("kind",),
    )
    return {
        "/health/live": {
            "get": _op(
                "200 while the process runs.", {"200": _json(_HEALTH, "Live.")}, tag="health"
            )
        },
        "/health/ready": {
            "get": _op(
                "200 once recovery is done and writes are taken (status `ready`, or `verifying`"
                " while a restore's digest check runs); 503 with a reason before, while "
                "quiesced, and after a failed check (`verification_failed`).",
                {"200": _json(_HEALTH, "Ready."), "503": _json(_HEALTH, "Not ready, and why.")},
                tag="health",
            )
        },
        "/openapi.json": {
            "get": _op(
                "This description of the HTTP API.",
                {"200": _json({"type": "object"}, "An OpenAPI 3.1 document.")},
                tag="health",
            )
        },
        "/v1/memories": {
            "post": _op(
                "Create a memory.",
                {"201": _json(wrote, "Created."), **_WRITE_ERRORS},
                body=_body(_CREATE_MEMORY),
            )
        },
        "/v1/memories/{id}": {
            "parameters": [_ID_PARAM],
            "get": _op(
                "One memory.",
                {
                    "200": _json(_MEMORY, "The memory."),
                    "404": _error("No such memory."),
                    **_READ_ERRORS,
                },
            ),
            "patch": _op(
                "Change a memory's content, strength or metadata (at least one).",
                {"200": _json(wrote, "Changed."), **_WRITE_ERRORS},
                body=_body(
                    _obj(
                        {
                            "content": {"type": "string"},
                            "strength": {"type": "number", "minimum": 0, "maximum": 1},
                            "metadata": {"type": "object"},
                        }
                    )
                ),
            ),
            "delete": _op(
                "Delete a memory and every edge to or from it.",
                {
                    "200": _json(
                        _obj(
                            {"id": _ID, "lsn": _LSN, "edges_deleted": {"type": "integer"}},
                            ("id", "lsn", "edges_deleted"),
                        ),
                        "Deleted.",
                    ),
                    **_WRITE_ERRORS,
                },
            ),
        },
        "/v1/memories/{id}/activate": {
            "parameters": [_ID_PARAM],
            "post": _op(
                "Decay the strength to now, then raise it by boost (default 0.1, capped at 1).",
                {
                    "200": _json(
                        _obj(
                            {"id": _ID, "lsn": _LSN, "strength": {"type": "number"}},
                            ("id", "lsn", "strength"),
                        ),
                        "Activated.",
                    ),
                    **_WRITE_ERRORS,
                },
                body=_body(
                    _obj({"boost": {"type": "number", "minimum": 0, "maximum": 1}}),
                    required=False,
                ),
            ),
        },
        "/v1/memories/{id}/neighbors": {
            "parameters": [_ID_PARAM],
            "get": _op(
                "The memories reachable within depth hops, breadth first.",
                {
                    "200": _json(
                        _obj(
                            {
                                "id": _ID,
                                "neighbors": {
                                    "type": "array",
                                    "items": _obj(
                                        {
                                            "depth": {"type": "integer"},
                                            "edge": _EDGE,
                                            "memory": _MEMORY,
                                        },
                                        ("depth", "edge", "memory"),
                                    ),
                                },
                            },
                            ("id", "neighbors"),
                        ),
                        "The neighbours.",
                    ),
                    "404": _error("No such memory."),
                    **_READ_ERRORS,
                },
                params=[
                    _query("direction", {"enum": ["out", "in", "both"], "default": "both"}, ""),
                    _query(
                        "depth", {"type": "integer", "minimum": 1, "maximum": 3, "default": 1}, ""
                    ),
                ],
            ),
        },
        "/v1/edges": {
            "post": _op(
                "Create (or re-weight) the edge src -> dst of a kind; both memories must exist.",
                {"201": _json(_EDGE_DONE, "Linked."), **_WRITE_ERRORS},
                body=_body(_CREATE_EDGE),
            ),
            "delete": _op(
                "Delete the edge src -> dst of a kind.",
                {"200": _json(_EDGE_DONE, "Unlinked."), **_WRITE_ERRORS},
                params=[
                    _query("src", _ID, "The edge's source memory.", required=True),
                    _query("dst", _ID, "The edge's target memory.", required=True),
                    _query("kind", {"type": "string", "default": "related"}, "The edge's kind."),
                ],
            ),
        },
        "/v1/recall": {
            "get": _op(
                "Full-text recall ranked by strength, with one step of spreading activation.",
                {
                    "200": _json(
                        _obj(
                            {
                                "query": {"type": "string"},
                                "results": {
                                    "type": "array",
                                    "items": {
                                        "allOf": [_MEMORY],
                                        "properties": {"score": {"type": "number"}},
                                    },
                                },
                            },
                            ("query", "results"),
                        ),
                        "The best matches, best first.",
                    ),
                    **_READ_ERRORS,
                },
                params=[
                    _query("query", {"type": "string"}, "The words to match.", required=True),
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 10},
                        "How many results.",
                    ),
                ],
            ),
        },
        "/v1/stats": {
            "get": _op(
                "How many memories and edges, the last LSN, the digest and the tiers.",
                {
                    "200": _json(
                        _obj(
                            {
                                "memories": {"type": "integer"},
                                "edges": {"type": "integer"},
                                "lsn": _LSN,
                                "digest": {"type": "string"},
                                "tiers": {"type": "object"},
                            },
                            ("memories", "edges", "lsn", "digest"),
                            extra=True,
                        ),
                        "The graph's counts and state.",
                    ),
                    **_READ_ERRORS,
                },
            )
        },
        "/v1/batch": {
            "post": _op(
                "Apply ops atomically: one bad op gets a 4xx naming its index and nothing is "
                "applied.",
                {
                    "200": _json(
                        _obj(
                            {"lsn": _LSN, "results": {"type": "array", "items": {}}},
                            ("lsn", "results"),
                        ),
                        "Every op applied, in one transaction.",
                    ),
                    **_WRITE_ERRORS,
                },
                body=_body(_obj({"ops": {"type": "array", "items": _OP}}, ("ops",))),
            )
        },
        "/v1/mark": {
            "post": _op(
                "Write a named restore point into the log (a name is used once).",
                {
                    "201": _json(
                        _obj({"name": {"type": "string"}, "lsn": _LSN}, ("name", "lsn")),
                        "Marked.",
                    ),
                    **_WRITE_ERRORS,
                },
                body=_body(_obj({"name": _ID}, ("name",))),
            )
        },
        "/v1/export": {
            "get": _op(
                "The whole graph as NDJSON ops, all of one state.",
                {
                    "200": {
                        "description": "create_memory then create_edge ops, one a line.",
                        "headers": {
                            "X-Engram-LSN": {
                                "schema": {"type": "integer"},
                                "description": "The state's LSN.",
                            },
                            "X-Engram-Digest": {
                                "schema": {"type": "string"},
                                "description": "The state's logical digest.",
                            },
                        },
                        "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
                    },
                    **_READ_ERRORS,
                },
            )
        },
        "/v1/admin/backup": {
            "post": _op(
                "Take a backup: streamed in the response, or into output on the server.",
                {
                    "200": {
                        "description": "Without output: the backup stream (docs/FORMAT.md "
                        '"Backup stream"), whose last frame is the result or an error. With '
                        "output: the result.",
                        "content": {
                            BACKUP_STREAM_TYPE.decode(): {
                                "schema": {
                                    "type": "string",
                                    "contentMediaType": "application/octet-stream",
                                }
                            },
                            _JSON: {"schema": {"type": "object"}},
                        },
                    },
                    **_WRITE_ERRORS,
                },
                tag="admin",
                body=_body(backup_body),
            )
        },
        "/v1/admin/quiesce": {
            "post": _op(
                "Pause writes (503 + Retry-After) after a checkpoint, for at most timeout_s.",
                {"200": _json({"type": "object"}, "Writes paused."), **_WRITE_ERRORS},
                tag="admin",
                body=_body(
                    _obj(
                        {"timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400}},
                        ("timeout_s",),
                    )
                ),
            )
        },
        "/v1/admin/resume": {
            "post": _op(
                "Take writes again.",
                {"200": _json({"type": "object"}, "Writes accepted."), **_WRITE_ERRORS},
                tag="admin",
                body=_body(_obj({}), required=False),
            )
        },
        "/v1/admin/status": {
            "get": _op(
                "What the server is doing: LSN, counts, tiers, quiesce, health, its process.",
                {"200": _json({"type": "object"}, "The status."), **_READ_ERRORS},
                tag="admin",
            )
        },
    }


@functools.cache
def _spec() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "engram",
            "version": __version__,
            "description": 'A graph database for memory graphs (README.md "HTTP API"). Every '
            "/v1 route takes `Authorization: Bearer <token>` when the server has a token; "
            "/v1/admin takes the admin token when there is one. Errors are "
            '`{"error", "message", "field"}`.',
        },
        "security": [{"dataToken": []}],
        "tags": [
            {"name": "health", "description": "Without auth."},
            {"name": "data", "description": "The graph: the data token."},
            {"name": "admin", "description": "Backups and quiesce: the admin token."},
        ],
        "paths": _paths(),
        "components": {
            "securitySchemes": {
                "dataToken": {"type": "http", "scheme": "bearer"},
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The server's admin token; the data token when it has none.",
                },
            },
            "schemas": {
                "Error": _obj(
                    {
                        "error": {"type": "string", "description": "A stable code, e.g. invalid."},
                        "message": {
                            "type": "string",
                            "description": "What went wrong, and what to do next.",
                        },
                        "field": {"type": "string", "description": "The field at fault."},
                        "index": {
                            "type": "integer",
                            "description": "POST /v1/batch: the bad op's index.",
                        },
                    },
                    ("error", "message"),
                    extra=True,
                ),
            },
        },
    }


def spec() -> dict[str, Any]:
    """The OpenAPI document (a fresh copy: a caller may change it)."""
    return copy.deepcopy(_spec())


def described() -> set[tuple[str, str]]:
    """(path, METHOD) of every operation the document describes."""
    methods = {"get", "post", "patch", "delete", "put", "head", "options"}
    return {
        (path, m.upper()) for path, item in _spec()["paths"].items() for m in item if m in methods
    }
