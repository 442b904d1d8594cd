"""Schemathesis over every operation of the app's own OpenAPI schema, in process, authenticated, with
valid (positive) and invalid (negative) data: no input may produce a server error. Plain generation
rarely produces the characters that broke the service (NUL, lone surrogates), so hooks make one
generated string hostile in about half the cases. Seeded (derandomized) and bounded per operation,
so a run is repeatable and short. (Over-deep JSON and over-long numbers cannot be sent from a
generated body: tests/kit/test_hostile_input.py sends them raw.)"""

from __future__ import annotations

import copy
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any, NoReturn

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from app.kit.errors import InvalidRequest
from app.main import create_app

# Fuzzed cases per operation (plus schemathesis' explicit examples); raise it for a longer hunt.
EXAMPLES = int(os.environ.get("TUNEHOUSE_FUZZ_EXAMPLES", "10"))
URL_HOSTILE = ["\x00"]  # a lone surrogate cannot even be percent-encoded into a URL
BODY_HOSTILE = ["\x00", "\ud800", "\udfff"]  # JSON bodies: escaped as "\\ud800"


class _NoInference:
    """Stands in for the inference worker (none runs in tests): a generated model name resolves to
    nothing, so these are never reached; if one is, the caller gets a 4xx, not a 503."""

    def _refuse(self, *_: Any) -> NoReturn:
        raise InvalidRequest("The fuzzing test serves no models.", param="model")

    async def chat(self, *args: Any) -> NoReturn:
        self._refuse(*args)

    async def open_chat_stream(self, *args: Any) -> AsyncIterator[str]:
        self._refuse(*args)

    async def completion(self, *args: Any) -> NoReturn:
        self._refuse(*args)

    async def open_completion_stream(self, *args: Any) -> AsyncIterator[str]:
        self._refuse(*args)

    async def predictions(self, *args: Any) -> NoReturn:
        self._refuse(*args)

    async def evict(self, storage_key: str) -> None:
        return None


def _string_paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, str):
        yield path
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _string_paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _string_paths(v, (*path, i))


def _with_suffix(value: Any, path: tuple[Any, ...], bad: str) -> Any:
    if not path:
        return value + bad
    out = copy.deepcopy(value)
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] += bad
    return out


def _spoiled(value: Any, bad: list[str]) -> st.SearchStrategy[Any]:
    """`value` as generated, or with one of its strings ending in a hostile character."""
    paths = list(_string_paths(value))
    if not paths:
        return st.just(value)
    spoil = st.tuples(st.sampled_from(paths), st.sampled_from(bad)).map(lambda pb: _with_suffix(value, *pb))
    return st.one_of(st.just(value), spoil)


# One app for the module (the schema is read at collection); each test binds it to that test's
# rolled-back session and the inference double.
APP = create_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.hook
def flatmap_body(ctx: Any, body: Any) -> st.SearchStrategy[Any]:
    # A multipart field is encoded by the client, which cannot encode a lone surrogate either.
    json_only = all("json" in alt.media_type for alt in ctx.operation.body)
    return _spoiled(body, BODY_HOSTILE if json_only else URL_HOSTILE)


@schema.hook
def flatmap_query(_: Any, query: Any) -> st.SearchStrategy[Any]:
    return _spoiled(query, URL_HOSTILE)


@schema.hook
def flatmap_path_parameters(_: Any, path_parameters: Any) -> st.SearchStrategy[Any]:
    return _spoiled(path_parameters, URL_HOSTILE)


@pytest.fixture
def auth(app: FastAPI, client: TestClient) -> dict[str, str]:
    APP.state.sessionmaker = app.state.sessionmaker
    APP.state.inference = _NoInference()
    return {"Authorization": f"Bearer {client.api_key}"}  # type: ignore[attr-defined]


@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
def test_no_input_makes_a_server_error(case: Any, auth: dict[str, str]) -> None:
    case.call_and_validate(headers=auth, checks=[not_a_server_error])
