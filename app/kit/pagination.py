"""Cursor pagination in the OpenAI list shape: {object: list, data, has_more, first_id, last_id}."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import BaseModel, Field
from sqlalchemy import Select
from sqlalchemy.orm import Session

from app.kit.errors import InvalidRequest

T = TypeVar("T")


class ListPage(BaseModel, Generic[T]):
    object: str = Field("list", description="Always `list`.")
    data: list[T] = Field(description="The page's items.")
    has_more: bool = Field(description="Whether another page follows (pass `last_id` as `after`).")
    first_id: str | None = Field(None, description="Id of the first item of the page; null when empty.")
    last_id: str | None = Field(
        None, description="Id of the last item of the page: the `after` cursor of the next page; null when empty.")


def check_limit(limit: int, maximum: int = 100) -> int:
    if not 1 <= limit <= maximum:
        raise InvalidRequest(f"limit must be between 1 and {maximum}, got {limit}", param="limit")
    return limit


def paginate(
    session: Session, stmt: Select[Any], model: Any, after: str | None, limit: int, order_col: Any,
    max_limit: int = 100, descending: bool = True,
) -> tuple[list[Any], bool]:
    """Keyset pagination on (order_col, id); `after` is the id of the last item of the previous page
    and must be one `stmt` can see (so another project's id is "no such object")."""
    check_limit(limit, max_limit)
    if after:
        anchor = session.execute(stmt.with_only_columns(order_col, model.id).where(model.id == after)).first()
        if anchor is None:
            raise InvalidRequest(f"No such object for 'after': {after}", param="after")
        if descending:
            stmt = stmt.where((order_col < anchor[0]) | ((order_col == anchor[0]) & (model.id < anchor[1])))
        else:
            stmt = stmt.where((order_col > anchor[0]) | ((order_col == anchor[0]) & (model.id > anchor[1])))
    keys = (order_col.desc(), model.id.desc()) if descending else (order_col, model.id)
    rows = list(session.scalars(stmt.order_by(*keys).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def page(items: list[T], has_more: bool) -> ListPage[T]:
    ids = [getattr(i, "id", None) for i in items]
    return ListPage[T](data=items, has_more=has_more, first_id=ids[0] if ids else None,
                       last_id=ids[-1] if ids else None)
