"""asyncnn.latency_gc: the collector frozen and tuned inside the block, as it was after."""

import gc

import pytest

import asyncnn
from asyncnn.collector import LATENCY_THRESHOLDS


def test_freezes_and_tunes_inside_and_restores_after():
    before = gc.get_threshold()
    frozen = gc.get_freeze_count()
    with asyncnn.latency_gc():
        assert gc.get_threshold() == LATENCY_THRESHOLDS
        assert gc.get_freeze_count() > frozen  # what existed is out of later passes
        made = [[] for _ in range(10)]  # new objects are the collector's again
        assert gc.is_tracked(made[0])
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_restores_when_the_block_raises():
    before = gc.get_threshold()
    with pytest.raises(RuntimeError), asyncnn.latency_gc((50, 5, 500)):
        assert gc.get_threshold() == (50, 5, 500)
        raise RuntimeError("the app failed")
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize("bad", [(100, 10), (100, -1, 10), (100.0, 10, 10), "100,10,1000"])
def test_bad_thresholds_are_named(bad):
    before = gc.get_threshold()
    with pytest.raises(ValueError, match="thresholds"), asyncnn.latency_gc(bad):
        pass
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_a_nested_block_leaves_the_enclosing_freeze_and_thresholds_in_place():
    before = gc.get_threshold()
    with asyncnn.latency_gc((200, 10, 1000)):
        outer = gc.get_freeze_count()
        with asyncnn.latency_gc((50, 5, 500)):
            assert gc.get_threshold() == (50, 5, 500)
        assert gc.get_threshold() == (200, 10, 1000)
        assert gc.get_freeze_count() >= outer > 0  # the inner exit did not unfreeze everything
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_what_the_app_froze_itself_stays_frozen():
    gc.freeze()  # as a pre-fork server does at start-up
    try:
        frozen = gc.get_freeze_count()
        with asyncnn.latency_gc():
            pass
        assert gc.get_freeze_count() >= frozen > 0
    finally:
        gc.unfreeze()
