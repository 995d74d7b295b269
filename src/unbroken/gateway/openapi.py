"""The OpenAPI 3.1 description of the gateway's API (served at `/openapi.json`)."""

from __future__ import annotations

from typing import Any

__all__ = ["openapi"]

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"enum": ["system", "user", "assistant", "tool", "developer", "function"]},
        "content": {"type": ["string", "array", "null"]},
        "name": {"type": "string"},
        "tool_calls": {"type": "array"},
        "tool_call_id": {"type": "string"},
        "reasoning_content": {"type": ["string", "null"]},
        "prefix": {"type": "boolean"},
    },
}

_CHAT_REQUEST = {
    "type": "object",
    "required": ["model", "messages"],
    "additionalProperties": True,
    "properties": {
        "model": {"type": "string", "examples": ["deepseek-chat"]},
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {"$ref": "#/components/schemas/Message"},
        },
        "stream": {"type": "boolean", "default": False},
        "stream_options": {
            "type": "object",
            "properties": {"include_usage": {"type": "boolean"}},
        },
        "max_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "n": {"type": "integer", "minimum": 1, "maximum": 16},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "tools": {"type": "array"},
        "tool_choice": {"oneOf": [{"type": "string"}, {"type": "object"}]},
        "response_format": {"type": "object"},
        "fallbacks": {
            "type": "array",
            "maxItems": 8,
            "items": {"type": "string"},
            "description": "unbroken: model names or configured route names to try next "
            "when the configured routes fail; never URLs",
        },
    },
}


def _error_responses(*statuses: int) -> dict[str, Any]:
    ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return {str(s): {"description": "OpenAI-shaped error", **ref} for s in statuses}


_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_JSON_OBJECT = {"application/json": {"schema": {"type": "object"}}}
_SESSIONS: dict[str, Any] = {
    "/v1/sessions": {
        "post": {
            "summary": "Create a conversation session owned by the calling key",
            "requestBody": {
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "model": {"type": "string"},
                                "system": {"type": "string"},
                                "title": {"type": "string"},
                            },
                            "additionalProperties": False,
                        }
                    }
                }
            },
            "responses": {
                "201": {"description": "the session", "content": _JSON_OBJECT},
                **_error_responses(400, 401),
            },
        },
        "get": {
            "summary": "The calling key's sessions, most recent first",
            "responses": {"200": {"description": "a list", "content": _JSON_OBJECT}},
        },
    },
    "/v1/sessions/{id}": {
        "get": {
            "summary": "A session and its messages",
            "parameters": [_ID],
            "responses": {
                "200": {"description": "the session", "content": _JSON_OBJECT},
                **_error_responses(404),
            },
        },
        "delete": {
            "summary": "Forget a session",
            "parameters": [_ID],
            "responses": {"200": {"description": "deleted"}, **_error_responses(404)},
        },
    },
    "/v1/sessions/{id}/messages": {
        "post": {
            "summary": "Send a user message; the answer streams (SSE) unless stream=false, "
            "and both turns are stored when it is complete",
            "parameters": [_ID],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["content"],
                            "properties": {
                                "content": {"type": "string", "minLength": 1},
                                "stream": {"type": "boolean"},
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": {
                    "description": "as POST /v1/chat/completions",
                    "content": {
                        "application/json": {"schema": {"type": "object"}},
                        "text/event-stream": {"schema": {"type": "string"}},
                    },
                },
                **_error_responses(400, 401, 404, 429, 502, 503),
            },
        }
    },
}


_SSE_OR_JSON = {
    "text/event-stream": {"schema": {"type": "string"}},
    "application/json": {
        "schema": {
            "type": "object",
            "properties": {
                "events": {"type": "array", "items": {"type": "object"}},
                "next": {"type": "string"},
                "done": {"type": "boolean"},
            },
        }
    },
}
_STREAMS: dict[str, Any] = {
    "/v1/streams/{id}": {
        "get": {
            "summary": "Read a streamed answer from its log (docs/streams.md): SSE replays the "
            "events after Last-Event-ID (or ?after=) then follows live to data: [DONE]; with "
            "Accept: application/json, one long-poll page",
            "parameters": [
                _ID,
                {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
                {"name": "after", "in": "query", "schema": {"type": "string"}},
                {"name": "wait", "in": "query", "schema": {"type": "number", "maximum": 60}},
                {"name": "access_token", "in": "query", "schema": {"type": "string"}},
            ],
            "responses": {
                "200": {"description": "events, or a long-poll page", "content": _SSE_OR_JSON},
                "204": {"description": "the stream ended before the given event id"},
                **_error_responses(400, 401, 403, 404, 410),
            },
        },
        "delete": {
            "summary": "Stop the answer: the upstream is cancelled and the log ends with a "
            "stop finish and [DONE]",
            "parameters": [_ID],
            "responses": {
                "200": {"description": "{id, object: stream, stopped}", "content": _JSON_OBJECT},
                **_error_responses(401, 403, 404, 410),
            },
        },
    }
}


def openapi(models: list[str]) -> dict[str, Any]:
    """The OpenAPI document, listing the served `models` in the examples."""
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
            "schemas": {"Error": _ERROR, "Message": _MESSAGE, "ChatRequest": _CHAT_REQUEST},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/chat/completions": {
                "post": {
                    "summary": "Create a chat completion (streamed as SSE when stream=true)",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/ChatRequest"}
                            }
                        },
                    },
                    "parameters": [
                        {"name": "X-Request-ID", "in": "header", "schema": {"type": "string"}}
                    ],
                    "responses": {
                        "200": {
                            "description": "a chat.completion, or an SSE stream of "
                            "chat.completion.chunk events ending with data: [DONE]",
                            "content": {
                                "application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": {"type": "string"}},
                            },
                        },
                        **_error_responses(400, 401, 403, 404, 413, 429, 502, 503, 504),
                    },
                }
            },
            "/v1/models": {
                "get": {
                    "summary": "The models served",
                    "responses": {
                        "200": {
                            "description": "a list",
                            "content": {
                                "application/json": {
                                    "example": {
                                        "object": "list",
                                        "data": [
                                            {"id": m, "object": "model", "owned_by": "unbroken"}
                                            for m in models
                                        ],
                                    }
                                }
                            },
                        },
                        **_error_responses(401),
                    },
                }
            },
            **_SESSIONS,
            "/v1/usage": {
                "get": {
                    "summary": "Requests, tokens and cost by day and model (an admin: any key's)",
                    "parameters": [
                        {"name": name, "in": "query", "required": False, "schema": {"type": kind}}
                        for name, kind in (
                            ("days", "integer"),
                            ("start", "string"),
                            ("end", "string"),
                            ("key", "string"),
                            ("price_at", "string"),
                        )
                    ],
                    "responses": {
                        "200": {
                            "description": "rows per day, key and model, and totals",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        **_error_responses(400, 401, 403),
                    },
                }
            },
            **_STREAMS,
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "security": [],
                    "responses": {"200": {"description": "text exposition format"}},
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "security": [],
                    "responses": {"200": {"description": "the process is up"}},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness (503 while draining or when the store is down)",
                    "security": [],
                    "responses": {
                        "200": {"description": "ready"},
                        "503": {"description": "not ready"},
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": {"description": "OpenAPI 3.1"}},
                }
            },
        },
    }
