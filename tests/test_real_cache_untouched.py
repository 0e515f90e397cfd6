"""The whole suite leaves the user's cache/ as it found it (tests/conftest.py redirects every test's cache)."""

import pytest

from tests.helpers import REAL_CACHE, cache_snapshot


@pytest.mark.runs_last
def test_the_real_cache_holds_nothing_new_after_the_suite(real_cache_before):
    from engine import store

    assert store.cache_root() != REAL_CACHE  # this test, like every other, runs on a private cache
    after = cache_snapshot()
    added = sorted(set(after) - set(real_cache_before))
    changed = sorted(k for k in set(after) & set(real_cache_before) if after[k] != real_cache_before[k])
    assert not added and not changed, f"tests wrote the user's cache/: added {added[:10]}, changed {changed[:10]}"
