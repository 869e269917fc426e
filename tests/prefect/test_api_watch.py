"""The run's watch on its Prefect API tells a server that went away from a busy one."""

from __future__ import annotations

import socket

from takeoff_cache_prefect.tempapi import _answers


def test_a_server_that_takes_connections_but_is_slow_to_answer_is_there() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:  # accepts, never answers HTTP
        port = busy.getsockname()[1]
        assert _answers(f"http://127.0.0.1:{port}/api")


def test_a_server_that_went_away_is_not() -> None:
    with socket.create_server(("127.0.0.1", 0)) as gone:
        port = gone.getsockname()[1]
    assert not _answers(f"http://127.0.0.1:{port}/api")
    assert not _answers("not a url")
