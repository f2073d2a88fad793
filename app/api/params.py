"""Parameters several routes take alike: a list's page (how many items, and where it starts: the cursor scheme
is `app.services.pagination`) and a model's id in the path."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Path, Query

Limit = Annotated[int, Query(ge=1, le=200, description="items on a page")]
Cursor = Annotated[str | None, Query(description="`next_cursor` of the previous page")]
ModelId = Annotated[uuid.UUID, Path(description="the model's id: the id of the job that trained it")]
