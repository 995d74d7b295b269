"""The OpenAPI 3.1 description of the gateway's API (served at `/openapi.json`), with full
request and response schemas: chat completions as JSON and as server-sent events (each
event's `data` is a chunk, an error object or `[DONE]`), models, sessions, health.

Request schemas describe what the gateway and a DeepSeek-compatible upstream accept where
JSON Schema can say it; rules that span fields (a tool message answers an earlier tool
call, JSON mode wants the word "json" in the prompt) are in the descriptions.
"""

from __future__ import annotations

from typing import Any

__all__ = ["METHODS", "allowed_methods", "openapi"]

# The methods of every path (OPTIONS answers with these in `Allow`).
METHODS: dict[str, tuple[str, ...]] = {
    "/v1/chat/completions": ("POST",),
    "/chat/completions": ("POST",),
    "/v1/models": ("GET",),
    "/models": ("GET",),
    "/v1/sessions": ("GET", "POST"),
    "/v1/sessions/{id}": ("GET", "PATCH", "DELETE"),
    "/v1/sessions/{id}/messages": ("POST",),
    "/v1/streams/{id}": ("GET", "DELETE"),
    "/v1/usage": ("GET",),
    "/v1/cache": ("DELETE",),
    "/v1/cache/invalidate": ("POST",),
    "/v1/cache/entries/{key}": ("DELETE",),
    "/streams/{id}": ("GET", "DELETE"),
    "/metrics": ("GET",),
    "/healthz": ("GET",),
    "/readyz": ("GET",),
    "/openapi.json": ("GET",),
}

_REF = "#/components/schemas/"


def allowed_methods(path: str) -> tuple[str, ...] | None:
    """The methods of `path` (session ids matched as `{id}`), or None for no such path."""
    methods = METHODS.get(path)
    if methods is not None:
        return methods
    parts = path.split("/")
    if path.startswith("/streams/") and len(parts) == 3 and parts[2]:
        return METHODS["/streams/{id}"]
    if path.startswith("/v1/cache/entries/") and len(parts) == 5 and parts[4]:
        return METHODS["/v1/cache/entries/{key}"]
    if path.startswith(("/v1/sessions/", "/v1/streams/")) and len(parts) in (4, 5) and parts[3]:
        parts[3] = "{id}"
        return METHODS.get("/".join(parts))
    return None


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    # OpenAI's API takes null for every optional field as "not set"; so does the gateway.
    return {"anyOf": [schema, {"type": "null"}]}


_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
_TOOL_CALL = {
    "type": "object",
    "required": ["id", "type", "function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name", "arguments"],
            "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
        },
    },
}
_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "description": "`content` may be null or absent on an assistant message only. Tool "
    "calls (an assistant's `tool_calls`, then one `tool` message answering each) and "
    "`prefix` (continue the last assistant message, on /beta routes) pass through to the "
    "upstream, which checks how they pair up.",
    "properties": {
        "role": {"enum": ["system", "user", "assistant"]},
        "content": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": _TEXT_PART},
                {"type": "null"},
            ]
        },
        "name": {"type": "string"},
        "reasoning_content": {"type": ["string", "null"]},
        "tool_calls": False,
        "prefix": False,
    },
    "if": {"properties": {"role": {"const": "assistant"}}},
    "then": {},
    "else": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
}

_CHAT_FIELDS: dict[str, Any] = {
    "stream": _nullable({"type": "boolean"}),
    "max_tokens": _nullable({"type": "integer", "minimum": 1, "maximum": 8192}),
    "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
    "top_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
    "presence_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
    "frequency_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
    "seed": _nullable({"type": "integer"}),
    "n": _nullable(
        {
            "type": "integer",
            "minimum": 1,
            "maximum": 16,
            "description": "choices; 1 when every route speaks DeepSeek (one choice per answer)",
        }
    ),
    "user": _nullable({"type": "string"}),
    "stop": _nullable(
        {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "maxItems": 16, "items": {"type": "string"}},
            ]
        }
    ),
}
_CHAT_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model", "messages"],
    "description": "Other OpenAI chat fields (tools, tool_choice, response_format, logprobs, "
    "stream_options with stream=true...) pass through to the upstream as they are.",
    "properties": {
        "messages": {"type": "array", "minItems": 1, "items": _ref("Message")},
        **_CHAT_FIELDS,
        "fallbacks": _nullable(
            {
                "type": "array",
                "maxItems": 8,
                "items": {"type": "string", "description": "a served model or a route name"},
                "description": "unbroken: model names or configured route names to try next "
                "when the configured routes fail; never URLs",
            }
        ),
    },
}

_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": {"type": "integer", "minimum": 0},
        "completion_tokens": {"type": "integer", "minimum": 0},
        "total_tokens": {"type": "integer", "minimum": 0},
    },
}
_FINISH = {
    "enum": ["stop", "length", "tool_calls", "content_filter", "insufficient_system_resource", None]
}
_ANSWER_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"const": "assistant"},
        "content": {"type": ["string", "null"]},
        "reasoning_content": {"type": ["string", "null"]},
        "tool_calls": {"anyOf": [{"type": "array", "items": _TOOL_CALL}, {"type": "null"}]},
    },
}
_COMPLETION = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "chat.completion"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "message", "finish_reason"],
                "properties": {
                    "index": {"type": "integer", "minimum": 0},
                    "message": _ANSWER_MESSAGE,
                    "finish_reason": _FINISH,
                },
            },
        },
        "usage": {"anyOf": [_USAGE, {"type": "null"}]},
        "unbroken": {
            "type": "object",
            "description": "how the gateway got the answer: route, attempts, cost",
            "required": ["route", "attempts"],
            "properties": {"route": {"type": "string"}, "attempts": {"type": "array"}},
        },
    },
}
_DELTA = {
    "type": "object",
    "properties": {
        "role": {"type": ["string", "null"]},
        "content": {"type": ["string", "null"]},
        "reasoning_content": {"type": ["string", "null"]},
        "tool_calls": {"type": ["array", "null"]},
    },
}
_CHUNK = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "chat.completion.chunk"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "delta"],
                "properties": {
                    "index": {"type": "integer", "minimum": 0},
                    "delta": _DELTA,
                    "finish_reason": _FINISH,
                },
            },
        },
        "usage": {"anyOf": [_USAGE, {"type": "null"}]},
    },
}
# One server-sent event of a chat stream. Comments (`: keep-alive`) are not events.
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    "if": {"properties": {"data": {"const": "[DONE]"}}},
    "else": {
        "properties": {
            "data": {
                "contentMediaType": "application/json",
                "contentSchema": {"anyOf": [_CHUNK, _ERROR]},
            }
        }
    },
}

_MODEL_LIST = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "object", "created", "owned_by"],
                "properties": {
                    "id": {"type": "string"},
                    "object": {"const": "model"},
                    "created": {"type": "integer"},
                    "owned_by": {"type": "string"},
                },
            },
        },
    },
}
_SESSION = {
    "type": "object",
    "required": ["id", "object", "created", "updated", "title", "model", "n_messages"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "session"},
        "created": {"type": "integer"},
        "updated": {"type": "integer"},
        "title": {"type": "string"},
        "model": {"type": "string"},
        "n_messages": {"type": "integer", "minimum": 0},
    },
}
_SESSION_LIST = {
    "type": "object",
    "required": ["object", "data", "first_id", "last_id", "has_more"],
    "properties": {
        "object": {"const": "list"},
        "data": {"type": "array", "maxItems": 100, "items": _ref("Session")},
        "first_id": {"type": ["string", "null"]},
        "last_id": {"type": ["string", "null"]},
        "has_more": {"type": "boolean"},
    },
}
_SESSION_DETAIL = {
    "allOf": [_ref("Session")],
    "type": "object",
    "required": ["messages", "has_more"],
    "properties": {
        "messages": {"type": "array", "items": {"type": "object", "required": ["role"]}},
        "has_more": {"type": "boolean"},
    },
}
_DELETED = {
    "type": "object",
    "required": ["id", "object", "deleted"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "session"},
        "deleted": {"const": True},
    },
}
_STATUS = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"type": "string"}},
}

_INVALIDATION = {
    "type": "object",
    "required": ["object", "scope", "deleted"],
    "properties": {
        "object": {"const": "cache.invalidation"},
        "scope": {"enum": ["key", "request", "model", "all"]},
        "deleted": {"type": "integer", "minimum": 0},
        "key": {"type": "string"},
        "model": {"type": "string"},
    },
}

# What POST /v1/cache/invalidate checks: the rest of a chat request only goes into its key
# (a request for a model no longer served may still have an entry).
_INVALIDATE_BODY = {
    "type": "object",
    "required": ["model", "messages"],
    "description": "a chat request as sent to /v1/chat/completions; the fields that shape "
    "the answer make its cache key (docs/cache.md)",
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "messages": {"type": "array", "minItems": 1, "items": {"type": "object"}},
    },
}

_ERROR_TEXT = {
    400: "malformed request",
    401: "missing or invalid gateway key",
    403: "a model, host or origin the caller may not use (or an admin-only endpoint)",
    404: "no such model, session or stream (or no answer cache)",
    405: "method not allowed",
    408: "the request head or body was too slow",
    410: "the stream expired (kept stream_ttl_s after its answer ended)",
    413: "request body or session too large",
    415: "the body is not declared JSON, or is encoded",
    422: "parameter values the upstream refused",
    429: "over a limit (Retry-After says when to retry)",
    431: "request head too large",
    502: "the upstream failed",
    503: "shutting down, store or upstream unavailable (Retry-After)",
    504: "the upstream timed out",
}
# What the HTTP layer and the shared checks may answer on any path.
_ALWAYS = (400, 403, 408, 413, 415, 431, 503)


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {
        str(s): {"description": _ERROR_TEXT[s], "content": _json(_ref("Error"))}
        for s in sorted({*statuses, *_ALWAYS})
    }


_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_PAGE = [
    {
        "name": "limit",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
    },
    {"name": "after", "in": "query", "schema": {"type": "string"}},
]
_ANSWER = {
    "description": "a chat.completion, or (stream=true) server-sent events: chunks, then "
    "data: [DONE]; an error after the first byte is an error event and no [DONE]",
    "content": {
        **_json(_ref("ChatCompletion")),
        "text/event-stream": {"schema": _ref("ChatStreamEvent")},
    },
}
_CHAT_ERRORS = (401, 403, 404, 422, 429, 502, 504)


def _chat_request(models: list[str], routes: list[str]) -> dict[str, Any]:
    names = sorted({*models, *routes})
    return {
        "allOf": [_ref("ChatRequest")],
        "properties": {
            "model": {"enum": models},
            "fallbacks": _nullable({"type": "array", "maxItems": 8, "items": {"enum": names}}),
        },
    }


def _session_message(models: list[str], chat_fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["content"],
        "properties": {
            "content": {"type": "string", "minLength": 1, "maxLength": 200_000},
            "model": _nullable({"enum": models}),
            "messages": False,
            **chat_fields,
        },
    }


def _paths(models: list[str], routes: list[str], chat_fields: dict[str, Any]) -> dict[str, Any]:
    chat = {
        "post": {
            "summary": "Create a chat completion (streamed as SSE when stream=true)",
            "requestBody": {"required": True, "content": _json(_chat_request(models, routes))},
            "parameters": [{"name": "X-Request-ID", "in": "header", "schema": {"type": "string"}}],
            "responses": {"200": _ANSWER, **_errors(*_CHAT_ERRORS)},
        }
    }
    model_list = {
        "get": {
            "summary": "The models served",
            "responses": {
                "200": {"description": "a list", "content": _json(_ref("ModelList"))},
                **_errors(401),
            },
        }
    }

    def status(summary: str, *codes: int) -> dict[str, Any]:
        return {
            "get": {
                "summary": summary,
                "security": [],
                "responses": {
                    **{str(c): {"description": summary, "content": _json(_STATUS)} for c in codes},
                    **_errors(),
                },
            }
        }

    return {
        "/v1/chat/completions": chat,
        "/v1/models": model_list,
        "/v1/sessions": {
            "post": {
                "summary": "Create a conversation session owned by the calling key",
                "requestBody": {
                    "content": _json(
                        {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "model": _nullable({"enum": models}),
                                "system": _nullable({"type": "string"}),
                                "title": {"type": "string"},
                            },
                        }
                    )
                },
                "responses": {
                    "201": {"description": "the session", "content": _json(_ref("Session"))},
                    **_errors(401, 429),
                },
            },
            "get": {
                "summary": "The calling key's sessions, most recent first, paged",
                "parameters": _PAGE,
                "responses": {
                    "200": {"description": "a page", "content": _json(_ref("SessionList"))},
                    **_errors(401),
                },
            },
        },
        "/v1/sessions/{id}": {
            "get": {
                "summary": "A session and its messages (paged by position: after=<index>)",
                "parameters": [
                    _ID,
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                    {
                        "name": "after",
                        "in": "query",
                        "schema": {"type": "string", "pattern": "^[0-9]+$"},
                    },
                ],
                "responses": {
                    "200": {"description": "the session", "content": _json(_SESSION_DETAIL)},
                    **_errors(401, 404),
                },
            },
            "patch": {
                "summary": "Rename a session",
                "parameters": [_ID],
                "requestBody": {
                    "required": True,
                    "content": _json(
                        {
                            "type": "object",
                            "required": ["title"],
                            "additionalProperties": False,
                            "properties": {"title": {"type": "string"}},
                        }
                    ),
                },
                "responses": {
                    "200": {"description": "the session", "content": _json(_ref("Session"))},
                    **_errors(401, 404),
                },
            },
            "delete": {
                "summary": "Forget a session",
                "parameters": [_ID],
                "responses": {
                    "200": {"description": "deleted", "content": _json(_DELETED)},
                    **_errors(401, 404),
                },
            },
        },
        "/v1/sessions/{id}/messages": {
            "post": {
                "summary": "Send a user message; the answer streams (SSE) unless "
                "stream=false, and both turns are stored when it is complete",
                "parameters": [_ID],
                "requestBody": {
                    "required": True,
                    "content": _json(_session_message(models, chat_fields)),
                },
                "responses": {"200": _ANSWER, **_errors(*_CHAT_ERRORS)},
            }
        },
        "/v1/usage": {
            "get": {
                "summary": "Requests, tokens and cost by day and model (an admin: any key's)",
                "parameters": [
                    {
                        "name": "days",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 93},
                    },
                    *(
                        {
                            "name": name,
                            "in": "query",
                            "schema": {"type": "string", "format": "date"},
                        }
                        for name in ("start", "end")
                    ),
                    {"name": "key", "in": "query", "schema": {"type": "string"}},
                    {"name": "price_at", "in": "query", "schema": {"enum": models}},
                ],
                "responses": {
                    "200": {
                        "description": "rows per day, key and model, and totals",
                        "content": _json({"type": "object"}),
                    },
                    **_errors(401, 403),
                },
            }
        },
        "/v1/cache": {
            "delete": {
                "summary": "Admin: forget cached answers, of one model or (without model) all",
                "parameters": [
                    {
                        "name": "model",
                        "in": "query",
                        "schema": {"type": "string", "minLength": 1, "maxLength": 256},
                    }
                ],
                "responses": {
                    "200": {"description": "what was removed", "content": _json(_INVALIDATION)},
                    **_errors(401, 403, 404),
                },
            }
        },
        "/v1/cache/invalidate": {
            "post": {
                "summary": "Admin: forget the cached answer of a chat request (its "
                "normalized key, as /v1/chat/completions would look it up)",
                "requestBody": {"required": True, "content": _json(_INVALIDATE_BODY)},
                "responses": {
                    "200": {"description": "what was removed", "content": _json(_INVALIDATION)},
                    **_errors(401, 403, 404),
                },
            }
        },
        "/v1/cache/entries/{key}": {
            "delete": {
                "summary": "Admin: forget one cached answer by its key",
                "parameters": [
                    {
                        "name": "key",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": "^v[0-9]{1,4}:[0-9a-f]{64}$"},
                    }
                ],
                "responses": {
                    "200": {"description": "what was removed", "content": _json(_INVALIDATION)},
                    **_errors(401, 403, 404),
                },
            }
        },
        "/v1/streams/{id}": {
            "get": {
                "summary": "Read a streamed answer from its log (docs/streams.md): SSE replays "
                "the events after Last-Event-ID (or ?after=) then follows live to data: [DONE]; "
                "with Accept: application/json, one long-poll page",
                "parameters": [
                    _ID,
                    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
                    {"name": "after", "in": "query", "schema": {"type": "string"}},
                    {"name": "wait", "in": "query", "schema": {"type": "number", "maximum": 60}},
                    {"name": "access_token", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {
                        "description": "events (SSE), or a long-poll page",
                        "content": {
                            "text/event-stream": {"schema": {"type": "string"}},
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["events", "next", "done"],
                                    "properties": {
                                        "events": {"type": "array", "items": {"type": "object"}},
                                        "next": {"type": "string"},
                                        "done": {"type": "boolean"},
                                    },
                                }
                            },
                        },
                    },
                    "204": {"description": "the stream ended before the given event id"},
                    **_errors(401, 403, 404, 410),
                },
            },
            "delete": {
                "summary": "Stop the answer: the upstream is cancelled and the log ends with a "
                "stop finish and [DONE]",
                "parameters": [_ID],
                "responses": {
                    "200": {
                        "description": "{id, object: stream, stopped}",
                        "content": _json({"type": "object"}),
                    },
                    **_errors(401, 403, 404, 410),
                },
            },
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {
                    "200": {
                        "description": "text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(),
                },
            }
        },
        "/healthz": status("Liveness", 200),
        "/readyz": status("Readiness (503 while draining or when the store is down)", 200, 503),
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {
                    "200": {"description": "OpenAPI 3.1", "content": _json({"type": "object"})},
                    **_errors(),
                },
            }
        },
    }


def openapi(
    models: list[str], routes: list[str] | None = None, *, max_choices: int = 16
) -> dict[str, Any]:
    """The OpenAPI document for a gateway serving `models` on the named `routes`, whose
    upstreams give at most `max_choices` choices per answer."""
    chat_fields = {
        **_CHAT_FIELDS,
        "n": _nullable({"type": "integer", "minimum": 1, "maximum": max_choices}),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "unbroken gateway",
            "version": "0.1.0",
            "description": "OpenAI-compatible chat completions in front of DeepSeek; "
            "streams survive upstream faults (retries, resume, fallbacks).",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": _ERROR,
                "Message": _MESSAGE,
                "ChatRequest": {
                    **_CHAT_REQUEST,
                    "properties": {**_CHAT_REQUEST["properties"], **chat_fields},
                },
                "ChatCompletion": _COMPLETION,
                "ChatCompletionChunk": _CHUNK,
                "ChatStreamEvent": _SSE_EVENT,
                "ModelList": _MODEL_LIST,
                "Session": _SESSION,
                "SessionList": _SESSION_LIST,
            },
        },
        "security": [{"bearer": []}],
        "paths": _paths(models, routes or [], chat_fields),
    }
