"""The two deadline errors: 4003 (no PRESENT within hb_int) and 4009 (no
heartbeat for 1.5 x hb_int).  These are the only tests that wait for the
node's timers; with hb_int = 3000 ms they take about 3 s and 8 s."""

import asyncio
import time

SLACK = 2.0  # seconds allowed past a deadline (a loaded 2-core machine)


async def test_no_present_within_hb_int_gets_4003(h):
    t0 = time.monotonic()
    c = await h.connect()
    hb = c.hello["hb_int"] / 1000
    await c.expect_fatal(4003, timeout=hb + SLACK + 5)
    elapsed = time.monotonic() - t0
    assert elapsed >= hb * 0.9, f"4003 after {elapsed:.2f}s, before hb_int ({hb}s) had passed"
    assert elapsed <= hb + SLACK, f"4003 only after {elapsed:.2f}s; expected about hb_int = {hb}s"


async def test_heartbeats_before_present_do_not_extend_the_present_deadline(h):
    t0 = time.monotonic()
    c = await h.connect()
    hb = c.hello["hb_int"] / 1000

    async def beat():
        while not c.closed.is_set():
            await c.heartbeat()
            await asyncio.sleep(hb / 4)

    task = asyncio.create_task(beat())
    try:
        await c.expect_fatal(4003, timeout=hb + SLACK + 5)
    finally:
        task.cancel()
    elapsed = time.monotonic() - t0
    assert elapsed <= hb + SLACK, f"4003 only after {elapsed:.2f}s; expected about hb_int = {hb}s"


async def test_missed_heartbeat_closes_with_4009_and_session_stays_resumable(h):
    c = await h.session(auto_heartbeat=False)
    hb = c.hello["hb_int"] / 1000
    # Heartbeat for a whole hb_int at half-interval pace: the session lives on.
    for _ in range(2):
        await asyncio.sleep(hb / 2)
        await c.roundtrip()
    last_beat = time.monotonic()
    # ... then stop.
    await c.expect_fatal(4009, timeout=1.5 * hb + SLACK + 5)
    elapsed = time.monotonic() - last_beat
    assert elapsed >= 1.5 * hb * 0.9, f"4009 after {elapsed:.2f}s, before 1.5 x hb_int had passed"
    assert elapsed <= 1.5 * hb + SLACK, f"4009 only after {elapsed:.2f}s; expected about 1.5 x hb_int = {1.5 * hb}s"

    # PROTOCOL.md section 6: a session stays resumable after a 4009.
    again = await h.connect(url=h.other_url(c.url))
    ready = await again.present(c.token, session_id=c.session_id, s=c.last_s)
    assert ready["resumed"] is True, f"session must be resumable after 4009: {ready}"
    assert ready["session_id"] == c.session_id
