"""A live answer's reader without a task while its producer writes to the client.

Why it exists: once a streamed answer's reader has caught up, its producer writes every new
event straight to the client (gateway/relay.py `LiveSink`), and the reader only waits for
the producer to hand the response back (the client stopped draining, a keep-alive is being
written, the answer ended, the client left). Waiting, its request task held the whole
coroutine chain of the request - uvicorn's `run_asgi`, `Gateway._http`, `serve_chat`,
`StreamRelay.events`, `StreamHub.follow_batches` - with their frames, the task and its
context: ~2.5 KB per live answer (bench/stream_memory.py). Instead the reader *detaches*:

* `StreamHub.follow_batches` (asked to) hands the reader to the producer with a `Detached`
  as its waiter and raises `Parked` where it would await a future; each layer of the chain
  catches it on the way up, skips its own cleanup and writes down in the `Detached` what
  its rest needs (the relay, the producer, the request's record...); the server's task body
  (`run_asgi` here, in place of uvicorn's) ends the task without completing the response;
* when the producer wakes it (it refused an event, or ended; or the relay was stopped:
  client gone, slow client, shutdown), `Detached.set_result` starts a new task in the
  request's context that runs the rest of the same layers (`Gateway._http_resume`):
  they pick up where the reader left off, may detach again, and at the end do what each
  layer did (the relay's result, metrics, the access log record, uvicorn's checks).

Only a server that runs the request through `run_asgi` offers it (the scope extension
`DETACH_EXTENSION`, gateway/guard.py); anywhere else the reader awaits as before.
Imports uvicorn's httptools cycle type only.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

__all__ = ["DETACH_EXTENSION", "Detached", "Parked", "run_asgi"]

logger = logging.getLogger(__name__)

# The scope extension under which the gateway's protocol offers detaching.
DETACH_EXTENSION = "unbroken.detach"


class Resumer(Protocol):
    """What runs the rest of a parked request: the connection's protocol
    (`GatewayHttpProtocol.resume_task`)."""

    def resume_task(
        self, cycle: RequestResponseCycle, detached: Detached, context: contextvars.Context
    ) -> None:
        """Run the rest of `detached`'s request in a new task, in `context`."""


class Detached:
    """A detached reader: what it waits for, and what the rest of its request needs (filled
    by each layer as `Parked` passes).

    It is its own waiter in the producer's hand-off (`Producer.park`): the producer (or
    the relay, when stopped) calls `set_result` once, and the rest of the request starts
    in a new task - no future with a done callback per live answer (~200 bytes).

    Attributes:
        producer: the producer it is parked on (`taken_back` on resuming).
        sink: the sink the producer writes to.
    The other attributes are the state of the layers above, each set by its layer.
    """

    # One per live answer: no instance dict.
    __slots__ = (
        "_ctx",
        "_done",
        "_resumer",
        "cache_key",
        "cycle",
        "ex",
        "gateway",
        "method",
        "observed",
        "path",
        "producer",
        "record",
        "relay",
        "sink",
        "stream_id",
        "streamed",
        "writer",
    )

    def __init__(self, producer: Any, sink: Any) -> None:
        self.producer = producer
        self.sink = sink
        self._done = False
        # Set by the layers above (gateway/relay.py, gateway/app.py) as `Parked` passes.
        self.relay: Any = None
        self.gateway: Any = None
        # The POST's own producer (None for a GET /v1/streams/{id} reconnect).
        self.writer: Any = None
        self.stream_id = ""
        self.streamed: Any = None  # a POST's booking; a GET reconnect's local writer
        self.cache_key: str | None = None
        self.observed: Any = None
        self.ex: Any = None
        self.record: Any = None
        self.path = ""
        self.method = ""
        self.cycle: RequestResponseCycle | None = None
        self._resumer: Resumer | None = None
        self._ctx: contextvars.Context | None = None

    def carry(self, before: Detached) -> None:
        """Take the layers' state of the hand-off `before` (a reader detaching again)."""
        self.gateway, self.writer, self.stream_id = before.gateway, before.writer, before.stream_id
        self.streamed, self.cache_key, self.observed = (
            before.streamed,
            before.cache_key,
            before.observed,
        )
        self.ex, self.record, self.path = before.ex, before.record, before.path
        self.method = before.method

    def park(self, cycle: RequestResponseCycle, resumer: Resumer) -> None:
        """The task ends here: `resumer.resume_task(cycle, self, context)` runs the rest
        once `set_result` is called (in a copy of this context: the request's, with its
        access record). The resumer (the connection's protocol), not its bound method, is
        held while parked: 64 bytes less per live answer (bench/stream_memory.py)."""
        self.cycle = cycle
        self._resumer = resumer
        self._ctx = contextvars.copy_context()
        if self._done:  # resolved before the task ended (not seen: nothing awaits between)
            self._done = False
            self.set_result(None)

    # The waiter's interface (`asyncio.Future`'s, as `Producer.park` uses it).

    def done(self) -> bool:
        """Whether the reader was woken."""
        return self._done

    def set_result(self, _: None) -> None:
        """Wake the reader: the rest of its request starts in a new task."""
        if self._done:
            return
        self._done = True
        resumer, cycle, ctx = self._resumer, self.cycle, self._ctx
        if resumer is None or cycle is None or ctx is None:
            return  # not parked yet: `park` wakes it
        self._ctx = None
        resumer.resume_task(cycle, self, ctx)


class Parked(BaseException):
    """Raised through a request's coroutine chain when its reader detaches (not an error:
    a BaseException, so no `except Exception` of the chain takes it for one)."""

    def __init__(self, detached: Detached) -> None:
        super().__init__()
        self.detached = detached


async def run_asgi(cycle: RequestResponseCycle, app: Any) -> None:
    """uvicorn's `RequestResponseCycle.run_asgi`, for an app whose reader may detach."""
    await _run(cycle, app(cycle.scope, cycle.receive, cycle.send))


async def resume_asgi(cycle: RequestResponseCycle, detached: Detached) -> None:
    """The rest of a detached request (see the module docstring), as `run_asgi` ends it."""
    await _run(cycle, detached.gateway._http_resume(detached))


async def _run(cycle: RequestResponseCycle, step: Awaitable[Any]) -> None:
    """Await a request's `step`; end the request as uvicorn does, or park it when its
    reader detached."""
    parked: Detached | None = None
    try:
        try:
            result = await step
        except Parked as exc:
            parked = exc.detached
        except BaseException as exc:
            await _failed(cycle, exc)
        else:
            await _returned(cycle, result)
    finally:
        if parked is None:
            cycle.on_response = _nothing
    del step
    if parked is not None:
        _park(cycle, parked)


def _park(cycle: RequestResponseCycle, detached: Detached) -> None:
    protocol = cycle.on_response  # the GuardedProtocol itself (its `__call__`)
    detached.park(cycle, protocol)  # type: ignore[arg-type]  # a GuardedProtocol, a Resumer


def _nothing() -> None:
    return None


async def _failed(cycle: RequestResponseCycle, exc: BaseException) -> None:
    # As uvicorn's run_asgi.
    cycle.logger.error("Exception in ASGI application\n", exc_info=exc)
    if not cycle.response_started:
        await cycle.send_500_response()
    else:
        cycle.transport.close()


async def _returned(cycle: RequestResponseCycle, result: Any) -> None:
    # As uvicorn's run_asgi.
    if result is not None:
        cycle.logger.error("ASGI callable should return None, but returned '%s'.", result)
        cycle.transport.close()
    elif not cycle.response_started and not cycle.disconnected:
        cycle.logger.error("ASGI callable returned without starting response.")
        await cycle.send_500_response()
    elif not cycle.response_complete and not cycle.disconnected:
        cycle.logger.error("ASGI callable returned without completing response.")
        cycle.transport.close()
