"""`kvrouter serve` tunes the cyclic garbage collector once it is up (router/serve_cli.py `tune_gc`)."""

from __future__ import annotations

import gc

from router.serve_cli import GC_YOUNG_THRESHOLD, tune_gc


def test_tune_gc_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    start_up = [object(), {"kept": ["alive"]}]  # stands for what start-up made and keeps
    try:
        tune_gc()
        assert gc.get_freeze_count() >= len(gc.get_referents(start_up))
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, before[1], before[2])
        assert not any(obj is start_up for obj in gc.get_objects())  # frozen: out of every generation
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
