"""client.models: /v1/models."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ._http import Transport
from .types import Deleted, Model

CHUNK = 1 << 20


class Models:
    def __init__(self, transport: Transport):
        self._t = transport

    def upload(self, path: str | Path, name: str | None = None) -> Model:
        """Import a Hugging Face format GPT-2 archive (.tar, .tar.gz/.tgz or .zip); `name` defaults, on the
        server, to the archive's name without its suffix."""
        path = Path(path)

        def parts(stack: ExitStack) -> dict[str, Any]:
            return {"file": (path.name, stack.enter_context(path.open("rb")))}

        data = {"name": name} if name is not None else None
        return Model.from_api(self._t.json("POST", "/v1/models", data=data, files=parts))

    def list(self, page_size: int | None = None) -> Iterator[Model]:
        """Every model, newest first, fetched page by page as the iteration goes."""
        for item in self._t.pages("/v1/models", {"limit": page_size}):
            yield Model.from_api(item)

    def get(self, model_id: str) -> Model:
        return Model.from_api(self._t.json("GET", f"/v1/models/{model_id}"))

    def download(self, model_id: str, path: str | Path) -> Path:
        """Stream the model (Hugging Face format, a .tar.gz) to `path`, or to `<path>/<model_id>.tar.gz` when
        `path` is a folder. The file appears complete or not at all; returns its path."""
        target = Path(path)
        if target.is_dir():
            target = target / f"{model_id}.tar.gz"
        partial = target.with_name(target.name + ".part")
        try:
            with self._t.send("GET", f"/v1/models/{model_id}/download", stream=True) as response:
                with partial.open("wb") as out:
                    for chunk in response.iter_bytes(CHUNK):
                        out.write(chunk)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target

    def delete(self, model_id: str) -> Deleted:
        return Deleted.from_api(self._t.json("DELETE", f"/v1/models/{model_id}"))
