"""Reconnecting to an unbroken gateway's stream log instead of continuing upstream.

An unbroken gateway says so in every response (`X-Unbroken-Gateway: 1`) and names each
streamed answer (`X-Unbroken-Stream-Id`). When the connection to it breaks mid-answer, the
drivers GET `/v1/streams/{id}` with `Last-Event-ID` and keep feeding the same attempt: the
gateway replays what came after that event and follows live, so the answer goes on with
no continuation request and no extra upstream tokens. Streamed requests opt into the
gateway's detached generation (`X-Unbroken-Resumable: 1`), so the answer keeps generating
while the client reconnects; a consumer that stops the stream early sends
`DELETE /v1/streams/{id}`, since stopping is not disconnecting. Requests and decisions
only; the sync and async drivers do the I/O.
"""

from __future__ import annotations

import httpx

from unbroken.client._common import AnswerRun
from unbroken.client._driver import request_headers
from unbroken.core.routes import Route

__all__ = ["GIVE_UP_STATUSES", "OPT_IN", "Reconnects"]

# The header that asks a gateway to keep generating while the client reconnects (other
# servers ignore an unknown header).
OPT_IN = ("X-Unbroken-Resumable", "1")
# Waits before each reconnect: at once first (a cut connection), then backing off while a
# gateway instance takes over a dead one's answer (its lease expires within seconds; the
# GET itself then waits for the new writer).
DELAYS_S = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)
# Answers that say the log cannot help (nothing more, gone, expired, not ours, a bad id):
# resume upstream.
GIVE_UP_STATUSES = frozenset({204, 400, 401, 403, 404, 410})


class Reconnects:
    """The reconnect state of one attempt on one route.

    Args:
        run: the answer's run (headers, configuration).
        route: the attempt's route.
        response: the attempt's response (its headers say whether the server is an
            unbroken gateway, and which stream the answer is).
    """

    __slots__ = ("_route", "_run", "n", "url")

    def __init__(self, run: AnswerRun, route: Route, response: httpx.Response) -> None:
        self._run = run
        self._route = route
        self.n = 0
        self.url: httpx.URL | None = None
        stream_id = response.headers.get("x-unbroken-stream-id")
        if response.headers.get("x-unbroken-gateway") == "1" and stream_id:
            self.url = run.config.url(route, f"/streams/{stream_id}", beta=False)

    def next_delay(self) -> float | None:
        """Seconds to wait before the next reconnect, or None: give up (not a gateway, or
        out of tries) and let the flow resume upstream as for any broken stream."""
        if self.url is None or self.n >= len(DELAYS_S):
            return None
        delay = DELAYS_S[self.n]
        self.n += 1
        return delay

    def _headers(self) -> dict[str, str]:
        return request_headers(self._route, self._run.extra_headers)

    def request(self, last_event_id: str) -> httpx.Request:
        """The GET that goes on after `last_event_id`."""
        assert self.url is not None  # noqa: S101 - next_delay() said to reconnect
        headers = self._headers()
        headers["Accept"] = "text/event-stream"
        headers["Last-Event-ID"] = last_event_id
        t = self._run.timeouts
        timeout = {"connect": t.connect_s, "read": None, "write": t.connect_s, "pool": t.connect_s}
        return httpx.Request("GET", self.url, headers=headers, extensions={"timeout": timeout})

    def stop_request(self) -> httpx.Request | None:
        """The DELETE that stops the answer when the consumer stops early (None when the
        server is not a gateway)."""
        if self.url is None:
            return None
        timeout = {"connect": 2.0, "read": 2.0, "write": 2.0, "pool": 2.0}
        return httpx.Request(
            "DELETE", self.url, headers=self._headers(), extensions={"timeout": timeout}
        )
