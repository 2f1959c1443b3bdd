"""`RankProcesses` reads a rank's last answer before it counts the rank's exit as a failure."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from pdserve.engine.expert_parallel import rank_process
from pdserve.engine.expert_parallel.rank_process import GroupFailed, RankProcesses


class _Exited:
    """A rank process that has already exited, cleanly."""

    exitcode = 0

    def is_alive(self) -> bool:
        return False

    def kill(self) -> None:  # pragma: no cover - never alive
        raise AssertionError("an exited rank is not killed")


def _ranks(conns: list) -> RankProcesses:
    ranks = RankProcesses.__new__(RankProcesses)  # no processes started: the pipes stand in
    ranks._conns, ranks._procs, ranks.size = conns, [_Exited() for _ in conns], len(conns)
    ranks.failure, ranks._on_phase, ranks._on_cache_events = None, None, None
    ranks._finalizer = lambda: None
    return ranks


def test_a_rank_that_refused_and_exited_is_heard_even_when_seen_dead_first(monkeypatch):
    (owner0, rank0), (owner1, rank1) = mp.Pipe(), mp.Pipe()
    for rank in (rank0, rank1):  # both refuse the config and exit, as a start-up error does
        rank.send(("err", ValueError("expert_parallel with quantization takes neither ..."), []))
    wait = mp.connection.wait
    calls = []

    def first_round_sees_rank1_only(conns, timeout):
        calls.append(1)
        ready = wait(conns, timeout)
        return [c for c in ready if c is owner1] if len(calls) == 1 else ready

    monkeypatch.setattr(rank_process.mp.connection, "wait", first_round_sees_rank1_only)
    ranks = _ranks([owner0, owner1])
    with pytest.raises(ValueError, match="takes neither"):
        ranks._gather(range(2), 5.0)
    assert "stopped on an error" in ranks.failure


def test_a_rank_that_exited_without_an_answer_fails_the_group():
    (owner0, rank0), (owner1, rank1) = mp.Pipe(), mp.Pipe()
    rank1.send(("ok", 1, []))
    rank0.close()  # rank 0 is gone: EOF, no answer
    with pytest.raises(GroupFailed, match="rank 0"):
        _ranks([owner0, owner1])._gather(range(2), 5.0)
