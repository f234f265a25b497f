#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (fuzz/corpus/<target>/).

Seeds are small valid inputs that reach each path: frames of every length
form and opcode; connections that present and then send every `f` and
every client event with good and bad `cnf`; tokens and claims. Run it after
changing the protocol; the fuzzer grows its own corpus from these.
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    path = os.path.join(HERE, "corpus", target, name)
    with open(path, "wb") as f:
        f.write(data)


def masked(b0, payload, mask=b"\x01\x02\x03\x04"):
    n = len(payload)
    if n < 126:
        head = bytes([b0, 0x80 | n])
    elif n <= 0xFFFF:
        head = bytes([b0, 0x80 | 126]) + struct.pack(">H", n)
    else:
        head = bytes([b0, 0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


# --- frame_reader ---------------------------------------------------------
write("frame_reader", "text", masked(0x81, b'{"f":120}'))
write("frame_reader", "fragments", masked(0x01, b'{"f":') + masked(0x80, b"120}"))
write("frame_reader", "controls", masked(0x89, b"ping") + masked(0x8A, b"") + masked(0x88, b"\x03\xe8bye"))
write("frame_reader", "len16", masked(0x81, b"x" * 300))
write("frame_reader", "len64", masked(0x82, b"y" * 70000)[:20])
write("frame_reader", "limit", masked(0x81, b"z" * 4096))
write("frame_reader", "unmasked", bytes([0x81, 0x03]) + b"abc")

# --- connection -------------------------------------------------------------
# Byte 0: 0 presents as a user, 1 as an admin, 2 sends no PRESENT. Then
# steps: header (low 2 bits: 0 text, 1 fragmented text, 2 control, 3 raw),
# 2-byte little-endian length, body.


def step(kind, body, extra=0):
    return bytes([(extra << 2) | kind]) + struct.pack("<H", len(body)) + body


def ex(t, cnf, s=1):
    return json.dumps({"f": 130, "t": t, "cnf": cnf, "s": s}).encode()


events = {
    "message": ex("MESSAGE_CREATE", {"content": "hello", "nonce": "n1"}),
    "message_bad": ex("MESSAGE_CREATE", {"content": ""}),
    "delete": ex("MESSAGE_DELETE", {"id": "123456789"}),
    "typing": ex("START_TYPING", {}),
    "channel_add": ex("CHANNEL_ADD", {"name": "fuzz-room", "topic": "t"}),
    "move": ex("CHANNEL_MOVE", {"channel": "general"}),
    "ban": ex("SYSTEM_BAN_ADD", {"user_id": "someone", "reason": "r", "duration_s": 60}),
    "unban": ex("SYSTEM_BAN_REMOVE", {"user_id": "someone"}),
    "dispatch_only": ex("ROOM_USER_ADD", {}),
    "heartbeat": b'{"f":120}',
    "present_again": b'{"f":110,"cnf":{"token":"x"}}',
    "resume": b'{"f":110,"cnf":{"token":"x","session_id":1,"s":0}}',
    "unknown_f": b'{"f":100}',
    "not_json": b"{nope",
}
for name, body in events.items():
    for who in (0, 1):
        write("connection", f"{name}-{who}", bytes([who]) + step(0, body))
write("connection", "create-then-delete", bytes([0]) + step(0, events["message"]) + step(0, events["delete"]))
write("connection", "add-move-say", bytes([1]) + step(0, events["channel_add"]) + step(0, ex("CHANNEL_MOVE", {"channel": "fuzz-room"})) + step(0, events["message"]))
write("connection", "fragmented", bytes([0]) + step(1, events["message"], extra=7))
write("connection", "ping-close", bytes([0]) + step(2, b"hi", extra=0) + step(2, b"\x03\xe8", extra=2))
write("connection", "no-present", bytes([2]) + step(0, events["message"]))
write("connection", "raw", bytes([2]) + step(3, b"\x81\x85\x00\x00\x00\x00{\"f\":"))

# --- token ----------------------------------------------------------------
write("token", "claims", json.dumps({"sub": "u1", "name": "alice", "exp": 4102444800}).encode())
write("token", "claims-full", json.dumps({"sub": "u1", "name": "a", "exp": 4102444800, "nbf": 0, "iss": "iss", "aud": ["aud"], "admin": True}).encode())
write("token", "claims-expired", json.dumps({"sub": "u1", "name": "a", "exp": 1}).encode())
write("token", "jwt-none", b"eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1MSIsIm5hbWUiOiJhIiwiZXhwIjo0MTAyNDQ0ODAwfQ.")
write("token", "garbage", b"a.b.c")
