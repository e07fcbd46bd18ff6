"""The HTTP bench's wrk script: every run posts new intents (never a cached retry)."""

import re

from producers.http.bench_tools import fresh_keys, post_script


def _key_prefixes(script: str) -> set[str]:
    return set(re.findall(r'thread:set\("id", "([^"]+)-"', script))


def test_each_run_gets_keys_of_its_own() -> None:
    script = post_script(["t1", "t2"], "/v1/sales/s/intents")
    assert "math.random" not in script  # wrk never seeds it: the same ids every run
    first, second = fresh_keys(script), fresh_keys(script)
    assert "__RUN__" not in first
    assert len(_key_prefixes(first)) == 1
    assert _key_prefixes(first) != _key_prefixes(second)


def test_threads_of_one_run_do_not_share_keys() -> None:
    script = fresh_keys(post_script(["t"], "/p"))
    # setup() numbers the threads: "<run>-<thread>" is each thread's key prefix
    assert 'thread:set("id", "' in script and '-" .. threads)' in script
