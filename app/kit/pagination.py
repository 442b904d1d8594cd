"""Cursor pagination in the OpenAI list shape: {object: list, data, has_more, first_id, last_id}."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import BaseModel, Field
from sqlalchemy import ColumnElement, Select, and_
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


def pinned(session: Session, col: Any, value: Any) -> ColumnElement[bool]:
    """`col = value` written as a range, for a query ordered by (col, ...): Postgres drops a column
    held equal to a constant from the ORDER BY, and may then walk another index that gives the order
    (job events: the seq primary key) filtering out other scopes' rows -- 200 000 skipped for the
    first page of a job with newer events of other jobs after it. Under a range, only the index that
    starts with `col` gives the order, and its scan starts at the page. (SQLite keeps the equality:
    it would bound that index's scan on `col` alone, walking down from the scope's newest row.)"""
    if session.get_bind().dialect.name != "postgresql":
        return col == value
    return and_(col >= value, col <= value)


def paginate(
    session: Session, stmt: Select[Any], model: Any, after: str | None, limit: int, order_col: Any,
    max_limit: int = 100, descending: bool = True, unique_order: bool = False, pin: tuple[Any, Any] | None = None,
) -> tuple[list[Any], bool]:
    """Keyset pagination on (order_col, id); `after` is the id of the last item of the previous page
    and must be one `stmt` can see (so another project's id is "no such object"). `unique_order`:
    order_col is unique within `stmt` (an event's seq, a job's checkpoint step), so id breaks no ties.
    `pin=(col, value)`: the scope `col = value`, held as a range and ordered by first (see `pinned`).

    Cost is one anchor lookup by id plus one index range scan of `limit + 1` rows, however deep the
    page, given an index on (scope columns, order_col, id): the bound on order_col alone is what the
    index seeks to (`order_col <= a`); the tie rule is a filter over the rows equal to the anchor.
    (An `order_col < a OR (order_col = a AND id < b)` bound is not an index condition on Postgres:
    the scan would start at the first page and filter its way down, one row per row skipped.)"""
    check_limit(limit, max_limit)
    if pin is not None:
        stmt = stmt.where(pinned(session, *pin))
    if after:
        anchor = session.execute(stmt.with_only_columns(order_col, model.id).where(model.id == after)).first()
        if anchor is None:
            raise InvalidRequest(f"No such object for 'after': {after}", param="after")
        if unique_order:
            stmt = stmt.where(order_col < anchor[0] if descending else order_col > anchor[0])
        elif descending:
            stmt = stmt.where(order_col <= anchor[0], (order_col < anchor[0]) | (model.id < anchor[1]))
        else:
            stmt = stmt.where(order_col >= anchor[0], (order_col > anchor[0]) | (model.id > anchor[1]))
    if unique_order:
        keys: tuple[Any, ...] = (order_col.desc(),) if descending else (order_col,)
    else:
        keys = (order_col.desc(), model.id.desc()) if descending else (order_col, model.id)
    if pin is not None:
        keys = (pin[0].desc() if descending else pin[0], *keys)
    rows = list(session.scalars(stmt.order_by(*keys).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def page(items: list[T], has_more: bool) -> ListPage[T]:
    ids = [getattr(i, "id", None) for i in items]
    return ListPage[T](data=items, has_more=has_more, first_id=ids[0] if ids else None,
                       last_id=ids[-1] if ids else None)
