"""An answer's accounting (`AnswerRun`'s books) and its flow's recovery state: shared while
nothing is accounted or failed, the answer's own once something is - and the shared ones
never written to."""

from __future__ import annotations

from typing import Any

from tests.support import RecordingHook
from unbroken.client._common import _NO_BOOKS, AnswerRun, ClientBase, _Books
from unbroken.core.flow import _NO_RECOVERY, Connect, Sleep, _Recovery
from unbroken.core.wire import ChatCompletionChunk, ChunkChoice, Delta, Usage
from unbroken.errors import UpstreamStatusError

MESSAGES = [{"role": "user", "content": "hi"}]


def _chunk(text: str, finish: str | None = None, usage: Usage | None = None) -> Any:
    return ChatCompletionChunk(
        id="c1",
        created=1,
        model="deepseek-chat",
        choices=[ChunkChoice(index=0, delta=Delta(content=text), finish_reason=finish)],
        usage=usage,
    )


def _pristine(cls: type[Any]) -> dict[str, object]:
    fresh = cls()
    return {name: getattr(fresh, name) for name in cls.__slots__}


def _answer(client: ClientBase, hooks: RecordingHook, *, fail_first: bool) -> AnswerRun:
    run = client._new_run("deepseek-chat", MESSAGES, {}, stream=True)
    now = 1.0
    assert run._books is _NO_BOOKS  # nothing accounted yet: nothing of its own
    action = run.next_action(None, now)
    if fail_first:
        assert isinstance(action, Connect)
        attempt = run.new_attempt(action.plan, now)
        attempt.finish(now, timed_out=True)
        error = UpstreamStatusError("busy", status_code=503, kind="server_error")
        action = run.next_action(run.end_attempt(attempt, now, status_code=503, error=error), now)
        assert isinstance(action, Sleep)
        now += action.seconds
        action = run.next_action(None, now)
    assert isinstance(action, Connect)
    attempt = run.new_attempt(action.plan, now)
    attempt.feed(b"data: " + _encode(_chunk("Hel")) + b"\n\n", now)
    usage = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    attempt.feed(b"data: " + _encode(_chunk("lo", "stop", usage)) + b"\n\n", now)
    attempt.feed(b"data: [DONE]\n\n", now)
    attempt.finish(now)
    outcome = run.end_attempt(attempt, now + 0.5, status_code=200, error=None)
    assert run.next_action(outcome, now + 0.5) is None
    return run


def _encode(chunk: ChatCompletionChunk) -> bytes:
    import msgspec

    return msgspec.json.encode(chunk)


def test_the_shared_books_and_recovery_are_never_written_to() -> None:
    """Answers that complete, retry (counts, events, a backoff) and are cancelled each
    account in books of their own, and a retried one's flow keeps its failure in recovery
    state of its own; the shared empty ones keep every default (a write to them would show
    in every later answer)."""
    hooks = RecordingHook()
    client = ClientBase("sk", "http://127.0.0.1:9", {"hooks": [hooks], "seed": 1})
    plain = _answer(client, hooks, fail_first=False)
    retried = _answer(client, hooks, fail_first=True)
    cancelled = client._new_run("deepseek-chat", MESSAGES, {}, stream=True)
    cancelled.close(2.0)
    assert {name: getattr(_NO_BOOKS, name) for name in _Books.__slots__} == _pristine(_Books)
    assert {name: getattr(_NO_RECOVERY, name) for name in _Recovery.__slots__} == _pristine(
        _Recovery
    )
    assert plain.rec is _NO_RECOVERY  # nothing failed: no recovery state of its own
    assert retried.rec is not _NO_RECOVERY
    assert (retried.rec.retries, retried.rec.last_error is not None) == (1, True)
    assert len({id(plain._books), id(retried._books), id(cancelled._books), id(_NO_BOOKS)}) == 4
    first, second = plain.completion(3.0), retried.completion(3.0)
    assert first.usage == Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    assert [a.outcome for a in first.unbroken.attempts] == ["complete"]
    assert (first.unbroken.retries, second.unbroken.retries) == (0, 1)
    assert [a.outcome for a in second.unbroken.attempts] == ["server_error", "complete"]
    assert [e.type for e in retried.drain_events()] == ["retrying"]
    assert retried.drain_events() == []
    assert [r.outcome for r in hooks.answers] == ["complete", "complete", "cancelled"]
    assert [r.attempts for r in hooks.answers] == [1, 2, 0]
    assert len(hooks.attempts) == 3


def test_a_first_request_that_continues_a_partial_answer_is_counted_as_a_resume() -> None:
    """`resume(partial=...)`: the answer's first request continues what was shown: the run
    counts it as a resume and tells it (a ResumedEvent), as for a broken stream."""
    client = ClientBase("sk", "http://127.0.0.1:9", {"seed": 1})
    run = client._new_run("deepseek-chat", MESSAGES, {}, stream=True)
    run.answer.feed(_chunk("Hel"))  # shown already
    action = run.next_action(None, 1.0)
    assert isinstance(action, Connect)
    assert action.plan.kind == "first"
    assert action.plan.continuation is not None
    assert run._books.counts["resume"] == 1
    events = run.drain_events()
    assert [type(e).__name__ for e in events] == ["ResumedEvent"]


def test_a_plain_first_request_is_not_announced() -> None:
    client = ClientBase("sk", "http://127.0.0.1:9", {"seed": 1})
    run = client._new_run("deepseek-chat", MESSAGES, {}, stream=True)
    assert isinstance(run.next_action(None, 1.0), Connect)
    assert run._books is _NO_BOOKS  # nothing counted, nothing told
    assert run.drain_events() == []
