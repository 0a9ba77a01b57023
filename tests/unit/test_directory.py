"""
The supervisor's directory of the relay's workers and a worker's replica of it (sans-IO),
and the codec of their messages.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel.relay._directory import Directory, Elsewhere, Replica
from tunnel.relay._workermsg import MAX_MESSAGE, MessageDecoder, MessageError, encode


def to(out: list[tuple[int, dict[str, Any]]], worker: int) -> list[dict[str, Any]]:
    return [m for w, m in out if w == worker]


def replicas(
    directory: Directory, out: list[tuple[int, dict[str, Any]]], rs: list[Replica]
) -> None:
    for w, m in out:
        if m["t"] in ("owners", "counts"):
            rs[w].update(m)


# -- the directory ------------------------------------------------------------------------------


def test_a_claim_is_told_to_every_worker() -> None:
    d = Directory(3)
    out = d.claim(1, "abc", False, "", "token:a")
    owners = [m for _, m in out if m["t"] == "owners"]
    assert [w for w, m in out if m["t"] == "owners"] == [0, 1, 2]
    assert owners[0] == {"t": "owners", "id": "abc", "workers": [1], "sig": ""}
    assert d.holders("abc") == [1]
    # What worker 0 and 2 learn of token:a's tunnels elsewhere: one; worker 1: none.
    counts = {w: m for w, m in out if m["t"] == "counts"}
    assert counts[0]["tunnels"] == counts[2]["tunnels"] == 1 and counts[1]["tunnels"] == 0


def test_the_same_random_id_on_another_worker_loses() -> None:
    d = Directory(2)
    d.claim(0, "abc", False, "", "p")
    out = d.claim(1, "abc", False, "", "p")
    assert out == [
        (1, {"t": "lost", "id": "abc", "reason": "the tunnel is held on another worker"})
    ]
    assert d.holders("abc") == [0] and d.conflicts == 1
    # Its release (the lost tunnel closed there) changes nothing.
    assert d.release(1, "abc", "p") == []
    assert d.holders("abc") == [0] and d.members_of("p") == 1


def test_a_name_is_a_pool_over_workers_with_one_signature() -> None:
    d = Directory(3)
    d.claim(0, "web", True, "sig-a", "p")
    out = d.claim(2, "web", True, "sig-a", "q")
    assert d.holders("web") == [0, 2]
    assert to(out, 1)[-1]["t"] in ("owners", "counts")
    lost = d.claim(1, "web", True, "sig-b", "r")
    assert lost[0][0] == 1 and lost[0][1]["t"] == "lost"
    assert "other options" in lost[0][1]["reason"]
    assert d.holders("web") == [0, 2]
    # A random id and a name of the same spelling conflict too.
    assert d.claim(1, "web", False, "", "r")[0][1]["t"] == "lost"


def test_members_on_one_worker_are_counted_until_the_last_leaves() -> None:
    d = Directory(2)
    d.claim(0, "web", True, "s", "p")
    d.claim(0, "web", True, "s", "p")
    assert d.members_of("p") == 2
    assert [m["t"] for _, m in d.release(0, "web", "p")] == ["counts", "counts"]
    assert d.holders("web") == [0]
    out = d.release(0, "web", "p")
    assert d.holders("web") == [] and d.tunnel_ids() == []
    assert {"t": "owners", "id": "web", "workers": [], "sig": ""} in to(out, 1)


def test_links_per_principal_are_what_the_others_hold() -> None:
    d = Directory(3)
    assert d.links(0, "p", 2) != []
    assert d.links(0, "p", 2) == []  # unchanged: nothing to tell
    out = d.links(1, "p", 1)
    assert d.links_of("p") == 3
    counts = {w: m["links"] for w, m in out}
    assert counts == {0: 1, 1: 2, 2: 3}
    d.links(0, "p", 0)
    d.links(1, "p", 0)
    assert d.links_of("p") == 0


def test_a_worker_gone_takes_what_it_held_and_is_not_told() -> None:
    d = Directory(2)
    d.claim(0, "abc", False, "", "p")
    d.claim(1, "web", True, "s", "p")
    d.links(0, "p", 1)
    out = d.worker_gone(0)
    assert all(w == 1 for w, _ in out)
    assert {"t": "owners", "id": "abc", "workers": [], "sig": ""} in to(out, 1)
    assert d.holders("abc") == [] and d.holders("web") == [1]
    assert d.links_of("p") == 0 and d.members_of("p") == 1
    # The id is free for the other worker now.
    assert all(m["t"] != "lost" for _, m in d.claim(1, "abc", False, "", "p"))


def test_a_restarted_worker_gets_a_snapshot() -> None:
    d = Directory(2)
    d.claim(0, "abc", False, "", "p")
    d.claim(0, "web", True, "s", "p")
    d.links(0, "p", 1)
    snap = d.snapshot(1)
    assert all(w == 1 for w, _ in snap)
    replica = Replica(1)
    for _, m in snap:
        replica.update(m)
    assert replica.elsewhere("abc") == [0] and replica.signature("web") == "s"
    assert replica.signature("abc") is None
    assert replica.links("p") == 1 and replica.tunnels("p") == 2


def test_unknown_workers_are_refused() -> None:
    d = Directory(2)
    with pytest.raises(ValueError):
        d.claim(2, "abc", False, "", "p")
    with pytest.raises(ValueError):
        d.links(-1, "p", 1)
    with pytest.raises(ValueError):
        Directory(0)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["claim", "release", "links", "gone"]),
            st.integers(0, 2),
            st.sampled_from(["a", "b", "web"]),
            st.sampled_from(["p", "q"]),
            st.integers(0, 3),
        ),
        max_size=60,
    )
)
def test_replicas_agree_with_the_directory(steps: list[tuple[str, int, str, str, int]]) -> None:
    d = Directory(3)
    rs = [Replica(i) for i in range(3)]
    for i in range(3):
        replicas(d, d.snapshot(i), rs)
    for kind, worker, tunnel_id, principal, n in steps:
        if kind == "claim":
            out = d.claim(worker, tunnel_id, tunnel_id == "web", "s", principal)
        elif kind == "release":
            out = d.release(worker, tunnel_id, principal)
        elif kind == "links":
            out = d.links(worker, principal, n)
        else:
            out = d.worker_gone(worker)
        for _, m in out:
            encode(m)  # every message the directory sends is well-formed
        replicas(d, out, rs)
        if kind == "gone":
            # Started again: it learns everything from a snapshot.
            rs[worker] = Replica(worker)
            replicas(d, d.snapshot(worker), rs)
        for tid in ("a", "b", "web"):
            holders = d.holders(tid)
            # A random id is never held by two workers.
            assert tid == "web" or len(holders) <= 1
            assert all(list(r.holders(tid)) == holders for r in rs)
        for r in rs:
            for p in ("p", "q"):
                assert r.tunnels(p) + d._members.get(p, {}).get(r.index, 0) == d.members_of(p)
                assert r.links(p) + d._links.get(p, {}).get(r.index, 0) == d.links_of(p)


def test_replica_picks_other_workers_in_turn() -> None:
    r = Replica(0)
    r.update({"t": "owners", "id": "web", "workers": [0, 1, 2], "sig": "s"})
    picks = {r.pick("web") for _ in range(10)}
    assert picks == {1, 2}
    assert r.pick("web", skip=[1, 2]) is None
    assert r.pick("nothing") is None
    r.update({"t": "owners", "id": "web", "workers": [], "sig": ""})
    assert r.holders("web") == () and r.signature("web") is None


def test_one_process_holds_nothing_elsewhere() -> None:
    nowhere = Elsewhere()
    assert nowhere.links("p") == nowhere.tunnels("p") == 0
    assert nowhere.holder("abc") is None and nowhere.signature("web") is None


# -- the codec ----------------------------------------------------------------------------------


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def test_messages_round_trip_split_anywhere() -> None:
    messages = [
        {"t": "claim", "id": "abc", "named": False, "sig": "", "principal": "token:x"},
        {"t": "owners", "id": "web", "workers": [0, 2], "sig": "s"},
        {"t": "probed", "probe": 7, "to": 1, "alive": True},
    ]
    data = b"".join(encode(m) for m in messages)
    for cut in range(len(data)):
        decoder = MessageDecoder()
        assert decoder.feed(data[:cut]) + decoder.feed(data[cut:]) == messages


@pytest.mark.parametrize(
    "message",
    [
        [],
        {"t": "nope"},
        {"t": "claim", "id": "abc", "named": False, "sig": ""},  # a field missing
        {"t": "links", "principal": "p", "n": 1, "extra": 2},  # a field too many
        {"t": "links", "principal": "p", "n": True},  # a bool is not a count
        {"t": "links", "principal": "p", "n": -1},
        {"t": "links", "principal": 5, "n": 1},
        {"t": "links", "principal": "x" * 5000, "n": 1},
        {"t": "owners", "id": "a", "workers": ["0"], "sig": ""},
        {"t": "owners", "id": "a", "workers": list(range(2000)), "sig": ""},
    ],
)
def test_malformed_messages_are_refused(message: Any) -> None:
    with pytest.raises(MessageError):
        MessageDecoder().feed(frame(json.dumps(message).encode()))
    with pytest.raises(MessageError):
        encode(message)


def test_frames_are_bounded_and_json() -> None:
    with pytest.raises(MessageError, match="over"):
        # Refused from its length alone, before the body arrives.
        MessageDecoder().feed(struct.pack(">I", MAX_MESSAGE + 1))
    MessageDecoder().feed(struct.pack(">I", MAX_MESSAGE))  # the largest is waited for
    with pytest.raises(MessageError, match="not JSON"):
        MessageDecoder().feed(frame(b"\xff{"))
