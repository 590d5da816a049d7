"""client.files: /v1/files."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ._http import Transport
from .types import Deleted, File


class Files:
    def __init__(self, transport: Transport):
        self._t = transport

    def upload(self, path: str | Path, purpose: str) -> File:
        """Upload a training text/JSONL (`purpose="train"`, or OpenAI's `"fine-tune"`), a generation input JSONL
        (`"generate"`) or OpenAI batch request lines (`"batch"`)."""
        path = Path(path)

        def parts(stack: ExitStack) -> dict[str, Any]:
            return {"file": (path.name, stack.enter_context(path.open("rb")))}

        return File.from_api(self._t.json("POST", "/v1/files", data={"purpose": purpose}, files=parts))

    def list(self, purpose: str | None = None, page_size: int | None = None) -> Iterator[File]:
        """Every file, newest first, fetched page by page as the iteration goes."""
        for item in self._t.pages("/v1/files", {"purpose": purpose, "limit": page_size}):
            yield File.from_api(item)

    def get(self, file_id: str) -> File:
        return File.from_api(self._t.json("GET", f"/v1/files/{file_id}"))

    def content(self, file_id: str) -> bytes:
        """The file's bytes, as uploaded."""
        return self._t.request("GET", f"/v1/files/{file_id}/content").content

    def delete(self, file_id: str) -> Deleted:
        return Deleted.from_api(self._t.json("DELETE", f"/v1/files/{file_id}"))
