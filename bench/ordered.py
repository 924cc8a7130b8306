"""``ordered``: the rate of one ordered endpoint answering at once (nginx), one attempt at a time.

``--ordered-events`` (3,000) events are published one at a time, each confirmed, before the
worker starts, for one endpoint
with ``ordered: true`` on nginx. The clock runs from the first attempt recorded to the last
(the settling second of ordered delivery and the worker's start are not counted: this is the
line's own pace). The order is checked too: the endpoint's successful attempts, in the order
they were recorded, follow the service's order (``occurred_at``, then storage order).
"""

from __future__ import annotations

import time

import sqlalchemy as sa

from bench.harness import EVENT_TYPE, Bench, Outcome, rate
from bench.load import order_event
from worker.store.tables import attempts, deliveries, events

ORG = "org_bench_ordered"
TARGET_RATE = 200


async def _order_kept(bench: Bench, webhook_id: str) -> tuple[bool, float | None, float | None]:
    """Whether success order is storage order, and the first and last attempt times."""
    stored = (
        sa.select(deliveries.c.event_id)
        .join(events, events.c.id == deliveries.c.event_id)
        .where(deliveries.c.webhook_id == webhook_id)
        .order_by(events.c.occurred_at, deliveries.c.created_at, deliveries.c.event_id)
    )
    sent = (
        sa.select(attempts.c.event_id, attempts.c.created_at)
        .where(attempts.c.webhook_id == webhook_id, attempts.c.success.is_(True))
        .order_by(attempts.c.created_at, attempts.c.id)
    )
    async with bench.store.engine.connect() as connection:
        stored_ids = [row.event_id for row in await connection.execute(stored)]
        sent_rows = (await connection.execute(sent)).all()
    if not sent_rows:
        return False, None, None
    sent_ids = [row.event_id for row in sent_rows]
    first, last = sent_rows[0].created_at.timestamp(), sent_rows[-1].created_at.timestamp()
    return sent_ids == stored_ids, first, last


async def ordered(bench: Bench, _done: dict[str, Outcome]) -> Outcome:
    sink = bench.nginx()
    outcome = Outcome("ordered", sink=sink.name)
    say = bench.say("ordered")
    await bench.reset()
    count = bench.sizes.ordered_events
    seeded = await bench.seed([(ORG, "/ordered", [EVENT_TYPE])], say, sink.base_url)
    webhook_id = seeded[0]
    async with bench.store.engine.begin() as connection:
        await connection.execute(
            sa.text("UPDATE webhooks SET ordered = true WHERE id = :id"), {"id": webhook_id}
        )
    # One at a time, each confirmed: the order of publishing is then the order of the queue
    # and of occurred_at, the one order an ordered endpoint promises.
    for n in range(count):
        await bench.publisher.publish(order_event(ORG, n=n))
    say(f"published {count} events, one at a time")
    async with bench.worker("ordered") as worker:
        done = await bench.drain(worker, count, time.time(), say, [webhook_id])
    kept, first, last = await _order_kept(bench, webhook_id)
    per_second = rate(done.total - 1, first, last) if first is not None else None
    outcome.add("deliveries/s, one ordered endpoint", per_second, "/s", at_least=TARGET_RATE)
    outcome.add("in storage order", 1.0 if kept else 0.0, "yes=1", at_least=1)
    outcome.details = {"events": count, "attempts": done.total, "failed": done.failed}
    outcome.notes.append(
        f"{count} events queued before the worker starts, for one ordered endpoint on nginx; "
        "rate from its first recorded attempt to its last; order = successes by record time "
        "against deliveries by (occurred_at, created_at, event_id)"
    )
    return outcome
