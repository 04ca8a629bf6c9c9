"""A module-scoped pytest-asyncio fixture: one pipeline shared by the tests of a module."""

import pytest
import pytest_asyncio

from asyncnn import Pipeline

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def inc(x):
    return x + 1


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared():
    async with Pipeline([inc, inc]) as p:  # async stages only: no thread outlives a test
        yield p


async def test_first_user(shared):
    assert await shared.send(1) == 3


async def test_second_user_sees_the_same_run(shared):
    assert await shared.send(2) == 4
    assert shared.stats().completed == 2 and shared.stats().run == 1
