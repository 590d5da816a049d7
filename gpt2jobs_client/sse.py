"""Reading server-sent events (https://html.spec.whatwg.org/multipage/server-sent-events.html): the lines of a
`text/event-stream` body into messages. What the job stream sends is in the API's api/event_stream.py."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

MEDIA_TYPE = "text/event-stream"


@dataclass(frozen=True)
class ServerSentEvent:
    event: str  # "message" when the server named none
    data: str
    id: str | None  # the message's own id field, if it had one
    retry: int | None  # a reconnection time (milliseconds) the server announced in it


def parse(lines: Iterable[str]) -> Iterator[ServerSentEvent]:
    """Messages from the body's lines (without their line endings), as a browser's EventSource dispatches them:
    fields up to a blank line; `data` lines joined with newlines; comments (`:`) and unknown fields skipped; a
    message with no data is not dispatched (but its `retry` is still reported)."""
    event, id_, retry = "", None, None
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield ServerSentEvent(event or "message", "\n".join(data), id_, retry)
            elif retry is not None:
                yield ServerSentEvent("", "", None, retry)
            event, data, id_, retry = "", [], None, None
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
        elif field == "id" and "\0" not in value:
            id_ = value
        elif field == "retry" and value.isdigit():
            retry = int(value)
