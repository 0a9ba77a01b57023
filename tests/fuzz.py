"""
Fuzzer for the link protocol's sans-IO core.

Feeds random and mutated frame sequences into a fresh `Multiplexer` (which must never raise
from `receive_data`: violations become events), into `FrameDecoder` (which may raise only
`ProtocolError`), and feeds random and mutated JSON into `control.decode_message` and
`StreamInfo.decode` (which may raise only `ControlError`). The ``message`` target builds
control messages member by member from hostile values (lone surrogates, oversized strings,
wrong types, deep nesting) and checks that whatever decodes keeps every member within its
rule, every string encodable to UTF-8 (so no handler meets a `UnicodeEncodeError`). Every
input's run time is measured against a budget; inputs over it are counted and the slowest
is reported.

    python -m tests.fuzz [--iterations 1000000] [--seed N] [--targets mux,decoder,control,message]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from tunnel.wire import control as C
from tunnel.wire import frames as F
from tunnel.wire.errors import ErrorCode, ProtocolError
from tunnel.wire.events import Event, LinkTerminated
from tunnel.wire.mux import LinkSettings, Multiplexer

__all__ = ["TARGETS", "Failure", "Report", "main", "run"]

#: Time one input may take before it is counted as slow.
BUDGET = 0.05
TARGETS = ("mux", "decoder", "control", "message")


@dataclass
class Failure:
    target: str
    data: bytes
    error: str


@dataclass
class Report:
    iterations: int = 0
    #: The first failures of each distinct kind (target and exception line).
    failures: list[Failure] = field(default_factory=list)
    failure_count: int = 0
    per_target: dict[str, int] = field(default_factory=dict)
    over_budget: int = 0
    slowest: float = 0.0
    slowest_target: str = ""
    elapsed: float = 0.0

    def summary(self) -> str:
        return (
            f"fuzz: {self.iterations} inputs in {self.elapsed:.1f}s "
            f"({', '.join(f'{k}={v}' for k, v in sorted(self.per_target.items()))}); "
            f"{self.failure_count} failures ({len(self.failures)} distinct); "
            f"{self.over_budget} over {BUDGET * 1000:.0f} ms; "
            f"slowest {self.slowest * 1000:.2f} ms ({self.slowest_target})"
        )


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.0001
        return self.now


# -- seeds: valid frame sequences ------------------------------------------------------------


def _random_frame(rng: random.Random, client_peer: bool) -> bytes:
    """One well-formed frame as a peer of the given role could send it."""
    sid = rng.choice([0, 1, 2, 3, 4, 5, 7, rng.randrange(1 << 32)])
    if client_peer and rng.random() < 0.7:
        sid |= 1
    kind = rng.randrange(9)
    if kind == 0:
        return F.encode_frame(F.FrameType.OPEN, 0, sid, rng.randbytes(rng.randrange(20)))
    if kind == 1:
        return F.encode_data(sid, rng.randbytes(rng.choice([0, 1, 10, 1000])), rng.random() < 0.3)
    if kind == 2:
        return F.encode_window(sid, rng.choice([1, 100, 1 << 16, (1 << 31) - 1]))
    if kind == 3:
        return F.encode_reset(sid, rng.randrange(20))
    if kind == 4:
        return F.encode_ping(rng.randbytes(8), rng.random() < 0.5)
    if kind == 5:
        return F.encode_goaway(rng.randrange(10), rng.choice([0, 0, 1, 8]), "x")
    if kind == 6:
        return F.encode_frame(F.FrameType.CONTROL, 0, 0, C.encode_message(_random_message(rng)))
    if kind == 7:
        return F.encode_hello(1, 1, {1: 1 << 14, 2: rng.randrange(5), 3: 1024})
    return F.encode_frame(rng.randrange(8, 256), rng.randrange(256), sid, rng.randbytes(5))


def _mux_transcript(rng: random.Random, client: bool) -> bytes:
    """What a real multiplexer of role `client` sends to its peer in a random session."""
    mux = Multiplexer(client=client, clock=_Clock())
    mux.receive_data(F.encode_hello(1, 1, {}))
    out = [mux.data_to_send()]
    ids: list[int] = []
    for _ in range(rng.randrange(1, 12)):
        action = rng.randrange(7)
        try:
            if action == 0 or not ids:
                ids.append(mux.open_stream(rng.randbytes(rng.randrange(8))))
            elif action == 1:
                mux.send(rng.choice(ids), rng.randbytes(rng.choice([1, 50, 3000, 70000])))
            elif action == 2:
                mux.end_stream(rng.choice(ids))
            elif action == 3:
                mux.reset_stream(rng.choice(ids), rng.randrange(16))
            elif action == 4:
                mux.ping()
            elif action == 5:
                mux.send_control(C.encode_message(_random_message(rng)))
            else:
                out.append(mux.data_to_send(budget=rng.choice([100, 10_000, 1 << 20])))
        except Exception:  # local misuse (sending on an ended stream): skip
            pass
    out.append(mux.data_to_send())
    return b"".join(out)


def _split_frames(data: bytes) -> list[bytes]:
    frames: list[bytes] = []
    offset = 0
    while len(data) - offset >= F.HEADER_SIZE:
        length = int.from_bytes(data[offset : offset + 3], "big")
        end = offset + F.HEADER_SIZE + length
        frames.append(data[offset:end])
        offset = end
    return frames


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        if not buf:
            buf += rng.randbytes(rng.randrange(1, 20))
        choice = rng.randrange(10)
        frames = _split_frames(bytes(buf))
        if choice == 0:  # bit flips
            for _ in range(rng.randrange(1, 4)):
                i = rng.randrange(len(buf))
                buf[i] ^= 1 << rng.randrange(8)
        elif choice == 1:  # truncation
            del buf[rng.randrange(len(buf) + 1) :]
        elif choice in (2, 3, 4, 5) and frames:  # header field changes in one frame
            index = rng.randrange(len(frames))
            frame = bytearray(frames[index])
            if len(frame) >= F.HEADER_SIZE:
                if choice == 2:  # length
                    current = int.from_bytes(frame[:3], "big")
                    length = rng.choice(
                        [0, 1, 4, 7, 8, 9, 16384, 65535, 65536, 65537, (1 << 24) - 1, current + 1]
                    )
                    frame[:3] = max(0, min(length, (1 << 24) - 1)).to_bytes(3, "big")
                elif choice == 3:  # type
                    frame[3] = rng.choice([*range(9), rng.randrange(256)])
                elif choice == 4:  # flags
                    frame[4] = rng.randrange(256)
                else:  # stream id
                    sid = rng.choice([0, 1, 2, 3, 4, (1 << 32) - 1, rng.randrange(1 << 32)])
                    frame[5:9] = sid.to_bytes(4, "big")
            frames[index] = bytes(frame)
            buf = bytearray(b"".join(frames))
        elif choice == 6 and frames:  # duplicate or drop a frame
            index = rng.randrange(len(frames))
            if rng.random() < 0.5:
                frames.insert(index, frames[index])
            else:
                del frames[index]
            buf = bytearray(b"".join(frames))
        elif choice == 7 and frames:  # reorder frames
            rng.shuffle(frames)
            buf = bytearray(b"".join(frames))
        elif choice == 8:  # random insertion
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.randrange(1, 12))
        else:  # concatenation of another valid sequence
            other = b"".join(_random_frame(rng, rng.random() < 0.5) for _ in range(3))
            buf += other
    return bytes(buf)


# -- JSON seeds ------------------------------------------------------------------------------


def _random_message(rng: random.Random) -> C.ControlMessage:
    choices: list[C.ControlMessage] = [
        C.AgentHello(1, "tok", "agent/1"),
        C.RelayWelcome("example.test", 443),
        C.ErrorMessage("unauthorized", "no"),
        C.TunnelRequest(rng.randrange(100), "tls", {"h2": True}),
        C.TunnelGranted(1, "abc", "abc.example.test", 443, None, None, "s"),
        C.TunnelRefused(1, "limit", "too many"),
        C.TunnelClose("abc"),
        C.TunnelClosed("abc", "evicted"),
    ]
    return rng.choice(choices)


_JSON_VALUES: list[object] = [None, True, False, 0, -1, 1.5, 1e308, "", "x", [], {}, [1, "a"]]


def _random_json(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.3:
        body = json.loads(C.encode_message(_random_message(rng)))
        for _ in range(rng.randrange(3)):
            key = rng.choice([*body, "type", "extra"])
            body[key] = rng.choice(_JSON_VALUES)
        return json.dumps(body).encode()
    if r < 0.45:
        info = C.StreamInfo("t", "1.2.3.4", 5).encode()
        return _mutate_bytes(rng, info)
    if r < 0.6:
        return _mutate_bytes(rng, C.encode_message(_random_message(rng)))
    if r < 0.7:
        depth = rng.choice([10, 100, 500, 2000, 10000])
        opener = rng.choice(["[", '{"a":'])
        return (opener * depth).encode()
    if r < 0.8:
        return rng.choice([b"NaN", b"1e999999", b'"\\ud800"', b"9" * 5000, b"\xff\xfe{}"])
    return rng.randbytes(rng.randrange(64))


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        if buf and rng.random() < 0.5:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif buf:
            del buf[rng.randrange(len(buf)) :]
    return bytes(buf)


# -- targets ---------------------------------------------------------------------------------


def _check_mux(rng: random.Random) -> bytes:
    client = rng.random() < 0.5
    if rng.random() < 0.5:
        data = _mux_transcript(rng, not client)
    else:
        data = F.encode_hello(1, 1, {}) + b"".join(
            _random_frame(rng, not client) for _ in range(rng.randrange(1, 10))
        )
    if rng.random() < 0.9:
        data = _mutate(rng, data)
    if rng.random() < 0.05:
        data = rng.randbytes(rng.randrange(100))
    settings = (
        LinkSettings()
        if rng.random() < 0.5
        else LinkSettings(
            max_frame_size=F.MIN_MAX_FRAME_SIZE,
            max_streams=rng.randrange(1, 4),
            initial_window=1024,
            max_window=4096,
            max_control_backlog=rng.choice([64, 1000]),
            reset_rate=1.0,
            reset_burst=2,
        )
    )
    mux = Multiplexer(client=client, settings=settings, clock=_Clock())
    if rng.random() < 0.5:
        mux.data_to_send()
    offset = 0
    while offset < len(data):
        step = rng.choice([1, 7, 64, 1 << 20])
        events = mux.receive_data(data[offset : offset + step])
        offset += step
        _check_events(mux, events)
        for sid in mux.stream_ids():
            window = mux.receive_window(sid)
            assert window is not None
            assert window.available >= 0 and mux.send_window(sid) >= 0
            assert window.size == window.available + window.unconsumed + window.unacknowledged
            if window.unconsumed and rng.random() < 0.3:
                mux.consumed(sid, rng.randrange(1, window.unconsumed + 1))
        if rng.random() < 0.5:
            mux.data_to_send(budget=rng.choice([1, 1000, 1 << 20]))
    mux.data_to_send()
    return data


def _check_events(mux: Multiplexer, events: list[Event]) -> None:
    for i, event in enumerate(events):
        assert isinstance(event, Event), event
        if isinstance(event, LinkTerminated):
            assert i == len(events) - 1, "events after LinkTerminated"
            assert mux.closed and mux.stream_count == 0
    if mux.closed:
        assert mux.receive_data(F.encode_ping(b"\x00" * 8)) == []


def _check_decoder(rng: random.Random) -> bytes:
    data = _mux_transcript(rng, rng.random() < 0.5)
    data = _mutate(rng, data)
    decoder = F.FrameDecoder(rng.choice([F.MIN_MAX_FRAME_SIZE, F.DEFAULT_MAX_FRAME_SIZE]))
    offset = 0
    try:
        while offset < len(data):
            step = rng.choice([1, 9, 100, 1 << 20])
            for frame in decoder.feed(data[offset : offset + step]):
                assert len(frame.payload) <= decoder.max_frame_size
            offset += step
            assert decoder.buffered < F.HEADER_SIZE + decoder.max_frame_size
    except ProtocolError as e:
        assert e.code is ErrorCode.FRAME_SIZE_ERROR
    return data


def _check_control(rng: random.Random) -> bytes:
    data = _random_json(rng)
    _decode_checked(data)
    return data


_HOSTILE_STRINGS = [
    "",
    "\ud800",
    "a\udfffb",
    "\udc00" * 3,
    "x" * 300,
    "x" * 1025,
    "x" * 5000,
    "é" * 513,
    "tls",
    "tcp",
    "abcdefghij234567",
    "UPPER",
    "a\nb",
    "\x00",
    "a.b",
    "h2",
]


def _hostile_value(rng: random.Random, depth: int = 0) -> object:
    r = rng.random()
    if r < 0.35:
        return rng.choice(_HOSTILE_STRINGS)
    if r < 0.5:
        return rng.choice([None, True, False, 0, 1, -1, 255, 256, 65535, 65536, 1 << 53, 1 << 70])
    if r < 0.6:
        return rng.choice([0.0, 0.5, 5.0, -1.0, 1e308, 86400.5])
    if r < 0.7:
        return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(8)))
    if depth > 5:
        return rng.choice(_HOSTILE_STRINGS)
    if r < 0.85:
        return [_hostile_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        rng.choice([*_HOSTILE_STRINGS, "allow", "client_ca"]): _hostile_value(rng, depth + 1)
        for _ in range(rng.randrange(4))
    }


def _hostile_message(rng: random.Random) -> bytes:
    body = json.loads(C.encode_message(_random_message(rng)))
    members = [name for name in body if name != "type"] + ["tunnel", "client", "server"]
    for _ in range(rng.randrange(1, 4)):
        body[rng.choice(members)] = _hostile_value(rng)
    if rng.random() < 0.1:
        body["type"] = rng.choice(_HOSTILE_STRINGS)
    if rng.random() < 0.1:
        del body[rng.choice(list(body))]
    # ensure_ascii: lone surrogates travel as the JSON escapes a hostile peer sends.
    return json.dumps(body).encode()


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    return []


def _decode_checked(data: bytes) -> None:
    """Decode with both decoders; only `ControlError`, and what decodes is within bounds."""
    try:
        message = C.decode_message(data)
    except C.ControlError:
        message = None
    if message is not None:
        for name, value in vars(message).items():
            valid, rule = C._FIELDS[name]
            assert valid(value), f"{message.TYPE}.{name} must be {rule}"
            for s in _strings(value):
                s.encode("utf-8")
        C.encode_message(message)
    try:
        info = C.StreamInfo.decode(data)
    except C.ControlError:
        return
    for s in (info.tunnel_id, info.client_host, info.server_host):
        assert len(s.encode("utf-8")) <= C.MAX_ADDRESS
    assert 0 <= info.client_port <= 65535 and 0 <= info.server_port <= 65535


def _check_message(rng: random.Random) -> bytes:
    data = _hostile_message(rng)
    _decode_checked(data)
    return data


_CHECKS: dict[str, Callable[[random.Random], bytes]] = {
    "mux": _check_mux,
    "decoder": _check_decoder,
    "control": _check_control,
    "message": _check_message,
}


def run(
    iterations: int = 1_000_000,
    seed: int | None = None,
    targets: tuple[str, ...] = TARGETS,
    max_failures: int = 1000,
) -> Report:
    """Run the fuzz loop; returns what was found. Never raises for a finding."""
    master = random.Random(seed)
    report = Report()
    seen: set[str] = set()
    started = time.perf_counter()
    for i in range(iterations):
        target = targets[i % len(targets)]
        input_seed = master.getrandbits(64)
        rng = random.Random(input_seed)
        t0 = time.perf_counter()
        try:
            _CHECKS[target](rng)
        except Exception as e:
            report.failure_count += 1
            kind = f"{target}: {type(e).__name__}: {str(e)[:60]}"
            if kind not in seen:
                seen.add(kind)
                # Regenerate the input for the report: same seed, same bytes.
                error = traceback.format_exc(limit=-4)
                report.failures.append(Failure(target, _regenerate(target, input_seed), error))
        elapsed = time.perf_counter() - t0
        if elapsed > BUDGET:
            report.over_budget += 1
        if elapsed > report.slowest:
            report.slowest, report.slowest_target = elapsed, f"{target} seed {input_seed}"
        report.iterations += 1
        report.per_target[target] = report.per_target.get(target, 0) + 1
        if report.failure_count >= max_failures:
            break
    report.elapsed = time.perf_counter() - started
    return report


def _regenerate(target: str, input_seed: int) -> bytes:
    rng = random.Random(input_seed)
    if target == "control":
        return _random_json(rng)
    if target == "message":
        return _hostile_message(rng)
    if target == "decoder":
        return _mutate(rng, _mux_transcript(rng, rng.random() < 0.5))
    return b"(see seed)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    parser.add_argument("--iterations", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--targets", default=",".join(TARGETS))
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    targets = tuple(t for t in args.targets.split(",") if t)
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    report = run(args.iterations, seed, targets)
    for failure in report.failures:
        print(f"FAILURE [{failure.target}] input={failure.data[:80]!r}", file=sys.stderr)
        print(failure.error, file=sys.stderr)
    print(f"seed {seed}: {report.summary()}")
    return 1 if report.failure_count else 0


if __name__ == "__main__":
    sys.exit(main())
