"""BatchBuilder with a fake clock; run_batcher with real bounded queues and a controllable clock.

An item's size is the wire module's estimate of its JSON (``wire.approx_bytes``): the items
here are built to an exact estimate, and the estimate is checked against the real JSON.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from ingest.batch import ENVELOPE_OVERHEAD_BYTES, BatchBuilder, item_bytes, run_batcher
from ingest.model import (
    ImageFacts,
    Item,
    ItemType,
    ObjectInfo,
    Rendition,
    Slot,
    UploadFacts,
    VideoFacts,
)
from ingest.registrar import wire

pytestmark = pytest.mark.timeout(30)

SIZE = 400  # the default item size below (a small single-image item is ~300 bytes)


def item(i: int, size: int = SIZE) -> Item:
    """A single-image item whose byte estimate is exactly ``size``: its key is padded (counted
    twice), its file name by one byte for an odd remainder."""
    name = f"n{i}"

    def build(key: str, file_name: str) -> Item:
        obj = ObjectInfo(key, 1)
        return Item("/", name, (Slot(name, ItemType.IMAGE, (obj,), file_name),), compact=True)

    pad = size - wire.approx_bytes(build("k", name))
    assert pad >= 0, f"an item cannot be smaller than {size - pad} bytes"
    out = build("k" + "x" * (pad // 2), name + "y" * (pad % 2))
    assert item_bytes(out) == size
    return out


def names(batch: list[Item]) -> list[str]:
    return [it.name for it in batch]


# --- BatchBuilder (pure) ----------------------------------------------------------------------


def _video(prefix: str, segments: int) -> VideoFacts:
    def index(q: str) -> str:
        lines = ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-TARGETDURATION:2"]
        for n in range(segments):
            lines += ["#EXTINF:2.000000,", f"{prefix}/segments/{q}/{n:09d}.ts"]
        return "\n".join([*lines, "#EXT-X-ENDLIST", ""])

    return VideoFacts(
        storage_key=f"{prefix}/clip.mp4",
        width=1920,
        height=1080,
        native_fps=30000 / 1001,
        visible_frames=107892,
        total_frames=107892,
        high=Rendition(index("high"), 5123456.789),
        low=Rendition(index("low"), 812345.678),
        sections_prefix=f"{prefix}/sections/high",
        sections_extension="png",
        frames_manifest_key=f"{prefix}/frames_manifest.txt",
        thumbnail_key=f"{prefix}/thumbnail.jpg",
        size_bytes=12_345_678_901,
        low_sections_prefix=f"{prefix}/sections/low",
        audio_peaks_key=f"{prefix}/audio_peaks.gz",
    )


PREFIX = "thumbnails/0b0e9f4c-7a55-4c2b/files/6e1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"

def _one(key: str, t: ItemType = ItemType.IMAGE, **slot: Any) -> Item:
    """A single-object item (compact unless it carries video facts)."""
    folder, _, name = key.rpartition("/")
    s = Slot(name, t, (ObjectInfo(key, 1),), name, **slot)
    return Item("/" + folder, name, (s,), compact=s.video is None)


def _estimate_cases() -> list[Any]:
    uni = "ünïcødé/画像 ファイル.png"
    series = tuple(ObjectInfo(f"scan/p1/{n:04d}.dcm", 1) for n in range(50))
    folder = (
        Slot("a.jpg", ItemType.IMAGE, (ObjectInfo("car/a.jpg", 1),), "a.jpg"),
        Slot("b.mp4", ItemType.VIDEO, (ObjectInfo("car/b.mp4", 1),), "b.mp4", fps=12.5),
    )
    dicom = Slot("0", ItemType.DICOM, series, "0000.dcm", extract_views=True)
    thumb = ImageFacts(4000, 3000, f"{PREFIX}/thumbnail.jpg")
    upload = UploadFacts(f"thumbnails/files/{'f' * 32}/a.jpg")
    return [
        pytest.param(_one("d/a.jpg"), id="compact image"),
        pytest.param(_one(uni), id="unicode"),
        pytest.param(_one("v/c.mp4", ItemType.VIDEO, fps="native"), id="compact video"),
        pytest.param(_one("d/a.jpg", facts=(thumb,)), id="read-only image"),
        pytest.param(_one("d/a.jpg", facts=(upload,)), id="uploaded local file"),
        pytest.param(Item("/", "car", folder), id="folder"),
        pytest.param(Item("/scan", "p1", (dicom,)), id="dicom series"),
        pytest.param(_one("v/c.mp4", ItemType.VIDEO, facts=(_video(PREFIX, 3),)), id="short video"),
        pytest.param(
            _one("v/c.mp4", ItemType.VIDEO, facts=(_video(PREFIX, 1800),)),
            id="hour-long video",
        ),
    ]


AZURE = "a-63-character-azure-container-name-" + "x" * 26 + "/"


@pytest.mark.parametrize("storage_prefix", ["", AZURE], ids=["s3", "azure"])
@pytest.mark.parametrize("it", _estimate_cases())
def test_item_bytes_is_never_below_the_wire_json(it: Item, storage_prefix: str) -> None:
    """The batcher's byte limit is a request body limit: the estimate must not undercount."""
    sent = len(orjson.dumps(wire.item_json(it, wire.KeyMap(storage_prefix))))
    assert item_bytes(it) == wire.approx_bytes(it)
    assert item_bytes(it) >= sent, f"estimated {item_bytes(it)}, sent {sent} bytes"


def test_the_item_helper_sizes_are_exact() -> None:
    assert [item_bytes(item(1, n)) for n in (SIZE, SIZE + 1, 5000)] == [SIZE, SIZE + 1, 5000]


def test_full_by_count() -> None:
    b = BatchBuilder(max_items=3, max_bytes=10**9, max_wait_s=1.0)
    assert b.add(item(1), 0.0) == []
    assert b.add(item(2), 0.0) == []
    (batch,) = b.add(item(3), 0.0)
    assert names(batch) == ["n1", "n2", "n3"]
    assert len(b) == 0 and b.deadline() is None
    assert b.add(item(4), 5.0) == []
    assert b.flush() is not None
    assert b.flush() is None


def test_full_by_bytes_never_exceeds_max_bytes_unless_alone() -> None:
    limit = ENVELOPE_OVERHEAD_BYTES + 3 * (SIZE + 1)
    b = BatchBuilder(max_items=100, max_bytes=limit, max_wait_s=1.0)
    assert b.add(item(1), 0) == [] and b.add(item(2), 0) == []
    (batch,) = b.add(item(3), 0)  # exactly reaches the limit
    assert names(batch) == ["n1", "n2", "n3"]
    b.add(item(4), 0)
    b.add(item(5), 0)
    # A bigger item would overflow: the pending pair goes out first, the new item stays.
    (batch,) = b.add(item(6, SIZE + 50), 0)
    assert names(batch) == ["n4", "n5"]
    assert len(b) == 1


def test_an_item_bigger_than_max_bytes_goes_alone() -> None:
    b = BatchBuilder(max_items=100, max_bytes=2000, max_wait_s=1.0)
    assert b.add(item(1), 0) == []
    ready = b.add(item(2, 5000), 0)
    assert [names(x) for x in ready] == [["n1"], ["n2"]]
    assert len(b) == 0
    # And when nothing is pending: a batch of one at once.
    assert [names(x) for x in b.add(item(3, 5000), 0)] == [["n3"]]


def test_deadline_is_set_by_the_oldest_item() -> None:
    b = BatchBuilder(max_items=10, max_bytes=10**9, max_wait_s=2.0)
    assert b.deadline() is None and b.flush_due(100.0) is None
    b.add(item(1), 10.0)
    b.add(item(2), 11.5)
    assert b.deadline() == 12.0
    assert b.flush_due(11.99) is None
    batch = b.flush_due(12.0)
    assert batch is not None and names(batch) == ["n1", "n2"]
    assert b.deadline() is None
    b.add(item(3), 20.0)  # a new batch opens its own deadline
    assert b.deadline() == 22.0


# --- run_batcher ------------------------------------------------------------------------------


class Clock:
    """A clock the test moves; records how often the batcher looked at it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start
        self.reads = 0
        self.read_event = asyncio.Event()

    def __call__(self) -> float:
        self.reads += 1
        self.read_event.set()
        return self.t


async def _get(q: asyncio.Queue[list[Item] | None]) -> list[Item]:
    """Wait for the next batch (the timeout only turns a hang into a failure)."""
    batch = await asyncio.wait_for(q.get(), 10.0)
    assert batch is not None
    return batch


async def test_trickle_is_flushed_after_max_wait_without_more_items() -> None:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[Item | None] = asyncio.Queue(10)
    outbox: asyncio.Queue[list[Item] | None] = asyncio.Queue(10)
    builder = BatchBuilder(max_items=10, max_bytes=10**9, max_wait_s=0.05)
    task = asyncio.create_task(run_batcher(inbox, outbox, builder, loop.time))
    t0 = loop.time()
    await inbox.put(item(1))
    batch = await _get(outbox)
    waited = loop.time() - t0
    assert names(batch) == ["n1"]
    assert 0.045 <= waited < 5.0
    # The next trickle item opens a fresh deadline.
    await inbox.put(item(2))
    assert names(await _get(outbox)) == ["n2"]
    await inbox.put(None)
    await asyncio.wait_for(task, 5)
    assert outbox.empty()


async def test_batcher_follows_the_injected_clock_not_the_wall_clock() -> None:
    inbox: asyncio.Queue[Item | None] = asyncio.Queue(10)
    outbox: asyncio.Queue[list[Item] | None] = asyncio.Queue(10)
    clock = Clock()
    builder = BatchBuilder(max_items=10, max_bytes=10**9, max_wait_s=0.01)
    task = asyncio.create_task(run_batcher(inbox, outbox, builder, clock))
    await inbox.put(item(1))
    # Let the batcher wake up on its own several times: the injected clock has not moved,
    # so the partial batch is not due and must stay put.
    for _ in range(5):
        clock.read_event.clear()
        await asyncio.wait_for(clock.read_event.wait(), 5)
    assert outbox.empty() and len(builder) == 1
    clock.t += 0.02  # now it is due
    assert names(await _get(outbox)) == ["n1"]
    await inbox.put(None)
    await asyncio.wait_for(task, 5)


async def test_no_item_lost_or_duplicated_and_final_flush() -> None:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[Item | None] = asyncio.Queue(7)
    outbox: asyncio.Queue[list[Item] | None] = asyncio.Queue(2)
    builder = BatchBuilder(
        max_items=4, max_bytes=ENVELOPE_OVERHEAD_BYTES + 5 * (SIZE + 1), max_wait_s=0.01
    )
    n = 503
    sizes = [SIZE if i % 17 else 5000 for i in range(n)]  # some oversize items go alone

    async def produce() -> None:
        for i in range(n):
            await inbox.put(item(i, sizes[i]))
            if i % 50 == 0:
                await asyncio.sleep(0)  # give the consumer a chance to see partial batches
        await inbox.put(None)

    prod = asyncio.create_task(produce())
    batcher = asyncio.create_task(run_batcher(inbox, outbox, builder, loop.time))
    batches = await collect(outbox, prod, batcher)
    got = [x for b in batches for x in names(b)]
    assert got == [f"n{i}" for i in range(n)]  # order kept, nothing lost or repeated
    for b in batches:
        assert 1 <= len(b) <= 4
        if len(b) > 1:
            assert sum(item_bytes(x) + 1 for x in b) + ENVELOPE_OVERHEAD_BYTES <= builder.max_bytes
            body = wire.envelope(b, wire.Target("team", "dataset", "storage"), wire.KeyMap())
            assert len(orjson.dumps(body)) <= builder.max_bytes  # what is really sent


async def test_bounded_queues_apply_back_pressure() -> None:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[Item | None] = asyncio.Queue(5)
    outbox: asyncio.Queue[list[Item] | None] = asyncio.Queue(1)
    builder = BatchBuilder(max_items=2, max_bytes=10**9, max_wait_s=60)
    batcher = asyncio.create_task(run_batcher(inbox, outbox, builder, loop.time))
    put_count = 0
    blocked = asyncio.Event()

    async def produce() -> None:
        nonlocal put_count
        for i in range(100):
            if inbox.full():
                blocked.set()
            await inbox.put(item(i))
            put_count += 1
        await inbox.put(None)

    prod = asyncio.create_task(produce())
    await asyncio.wait_for(blocked.wait(), 5)
    # Nobody reads the outbox: it holds 1 batch, the batcher holds 1 more waiting to be put,
    # plus one partial, and the inbox is full. The producer is stuck far from 100.
    await asyncio.wait_for(_until(lambda: inbox.full() and outbox.full()), 5)
    assert put_count <= 5 + 2 + 2 + 1
    assert not prod.done()
    # Drain: everything arrives exactly once.
    got = [x for b in await collect(outbox, prod, batcher) for x in names(b)]
    assert got == [f"n{i}" for i in range(100)]


async def _until(pred: Callable[[], bool]) -> None:
    # Not a timed wait: yield to the other tasks, one loop step at a time, until the state holds.
    while not pred():  # noqa: ASYNC110
        await asyncio.sleep(0)


async def collect(
    outbox: asyncio.Queue[list[Item] | None], *tasks: asyncio.Task[None]
) -> list[list[Item]]:
    """Every batch until the tasks are done and the outbox is empty."""
    done: asyncio.Future[list[None]] = asyncio.ensure_future(asyncio.gather(*tasks))
    batches: list[list[Item]] = []
    while not (done.done() and outbox.empty()):
        getter = asyncio.ensure_future(outbox.get())
        pending: set[asyncio.Future[Any]] = {getter, done}
        await asyncio.wait(pending, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            b = getter.result()
            assert b is not None
            batches.append(b)
        else:
            getter.cancel()
            assert done.done(), "batcher hung"
    await done
    return batches
