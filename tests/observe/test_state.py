"""observe.state: commits are all-or-nothing against the checkpoint, a killed commit is undone
on open, hours are compacted and expired, proposals are published atomically, cursors and
positions survive a round trip through the checkpoint."""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from observe.errors import InputError
from observe.logstream import Cursor, LogChunk, StreamKey
from observe.pipeline import ObserveOptions, ObserveStats
from observe.state import (
    CHECKPOINT,
    INVENTORY_VERSION,
    Checkpoint,
    FlowStore,
    Publisher,
    committed_files,
    compact_hour,
    merge_edge_summary,
    read_table,
)
from observe.streamflows import stream_flow_batches

DATA = Path(__file__).parents[1] / "data" / "envoy-logs" / "istio-docs-access-log-sleep-httpbin.log"
BASE = 1_606_339_578_409_000_000
KEY = StreamKey("foo", "sleep-1", "istio-proxy", "uid-sleep-1")


def _batches(first: int, n: int) -> list[pa.RecordBatch]:
    """``n`` real Istio outbound lines (paths /status/<ordinal>) as flow batches."""
    outbound = DATA.read_text().splitlines()[0]
    lines = [outbound.replace("/status/418", f"/status/{first + i}") for i in range(n)]
    chunk = LogChunk(KEY, lines, [BASE + i for i in range(n)], first)
    return list(stream_flow_batches([chunk], ObserveOptions(workers=1), ObserveStats()))


class Clock:
    def __init__(self, t: datetime) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t


def _paths(store: FlowStore) -> list[str]:
    return sorted(read_table(store.files(), ["path"]).column("path").to_pylist(),
                  key=lambda p: int(p.rsplit("/", 1)[1]))


def test_commit_then_reopen_keeps_rows_and_cursors(tmp_path: Path) -> None:
    cursor = Cursor()
    for i in range(5):
        cursor.admit(BASE + i // 2, f"line {i}".encode())
    rvs = {("pods", None): "1234", ("services", "foo"): "99"}
    store = FlowStore(tmp_path)
    assert store.commit(_batches(1, 10),
                        Checkpoint(cursors={KEY: cursor.state()}, resource_versions=rvs,
                                   pods=[{"metadata": {"uid": "u"}}])) == 10
    again = FlowStore(tmp_path)
    assert again.checkpoint.seq == 1
    assert again.checkpoint.cursors == {KEY: cursor.state()}
    assert again.checkpoint.resource_versions == rvs
    assert again.checkpoint.pods == [{"metadata": {"uid": "u"}}]
    assert _paths(again) == [f"/status/{i}" for i in range(1, 11)]
    # A restored cursor drops what it delivered when the overlap comes again.
    restored = Cursor.restore(again.checkpoint.cursors[KEY])
    restored.reconnect()
    assert [restored.admit(BASE + i // 2, f"line {i}".encode()) for i in range(2, 7)] == [
        False, False, False, True, True]
    assert restored.delivered == 7


def test_part_without_checkpoint_is_discarded_on_open(tmp_path: Path) -> None:
    store = FlowStore(tmp_path)
    store.commit(_batches(1, 3), Checkpoint(resource_versions={("pods", None): "5"}))
    saved = (tmp_path / CHECKPOINT).read_bytes()
    store.commit(_batches(4, 3), Checkpoint(), inventory=False)
    # Killed after the part was renamed but before the checkpoint was: put the old one back.
    (tmp_path / CHECKPOINT).write_bytes(saved)
    (tmp_path / "flows" / ".part-x.tmp").write_bytes(b"half")  # a temporary of the killed run
    (tmp_path / "pods-000000000002.json").write_text("{}")  # its pod history, never named
    reopened = FlowStore(tmp_path)
    assert reopened.stats.discarded_parts == 1
    assert reopened.checkpoint.resource_versions == {("pods", None): "5"}
    assert sorted(p.name for p in tmp_path.glob("pods-*")) == ["pods-000000000001.json"]
    assert _paths(reopened) == ["/status/1", "/status/2", "/status/3"]
    assert not list((tmp_path / "flows").glob(".*"))
    # The next commit reuses the discarded seq without clashing.
    reopened.commit(_batches(4, 2), Checkpoint())
    assert _paths(FlowStore(tmp_path)) == [f"/status/{i}" for i in range(1, 6)]


def test_commit_without_rows_writes_only_the_checkpoint(tmp_path: Path) -> None:
    store = FlowStore(tmp_path)
    store.commit([], Checkpoint(resource_versions={("pods", None): "7"}))
    assert store.files() == []
    assert FlowStore(tmp_path).checkpoint.resource_versions == {("pods", None): "7"}


def test_pod_history_is_kept_until_it_changes(tmp_path: Path) -> None:
    store = FlowStore(tmp_path)
    pods = [{"metadata": {"uid": "a"}}]
    store.commit([], Checkpoint(resource_versions={("pods", None): "7"}, pods=pods))
    # Not rewritten: what is passed is ignored, the previous history stays.
    store.commit([], Checkpoint(resource_versions={("pods", None): "9"}), inventory=False)
    ckpt = FlowStore(tmp_path).checkpoint
    assert (ckpt.seq, ckpt.resource_versions, ckpt.pods) == (2, {("pods", None): "7"}, pods)
    assert ckpt.pods_file == "pods-000000000001.json"
    store.commit([], Checkpoint(resource_versions={("pods", None): "9"}, pods=[]))
    ckpt = FlowStore(tmp_path).checkpoint
    assert (ckpt.resource_versions, ckpt.pods) == ({("pods", None): "9"}, [])
    assert sorted(p.name for p in tmp_path.glob("pods-*")) == ["pods-000000000003.json"]


def test_corrupt_checkpoint_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT).write_text("{not json")
    with pytest.raises(InputError, match="corrupt checkpoint"):
        FlowStore(tmp_path)


def test_partitions_compaction_and_retention(tmp_path: Path) -> None:
    clock = Clock(datetime(2024, 5, 1, 10, 15, tzinfo=UTC))
    store = FlowStore(tmp_path, retention=timedelta(hours=2), clock=clock)
    n = 0
    for minutes in (0, 10, 50, 70, 100, 130, 190, 250):  # commits from 10:15 to 14:25
        clock.t = datetime(2024, 5, 1, 10, 15, tzinfo=UTC) + timedelta(minutes=minutes)
        store.commit(_batches(n + 1, 2), Checkpoint())
        n += 2
    hours = sorted(p.parent.name + "/" + p.name for p in store._hours())
    assert hours == ["dt=2024-05-01/hour=10", "dt=2024-05-01/hour=11", "dt=2024-05-01/hour=12",
                     "dt=2024-05-01/hour=13", "dt=2024-05-01/hour=14"]
    # 10:15, 10:25 | 11:05, 11:25, 11:55 | 12:25 | 13:25 | 14:25 (current, not compacted).
    assert store.compact() == 5
    assert [f.name for f in store.files()][:2] == ["compact-000000000001-000000000002.parquet",
                                                   "compact-000000000003-000000000005.parquet"]
    assert _paths(store) == [f"/status/{i}" for i in range(1, n + 1)]
    # Now 14:25, retention 2 h: hours ending at or before 12:25 go (10:xx, 11:xx).
    summarized: list[str] = []
    assert store.expire(lambda files: summarized.extend(f.name for f in files)) == 2
    assert summarized == ["compact-000000000001-000000000002.parquet",
                          "compact-000000000003-000000000005.parquet"]
    assert _paths(store) == [f"/status/{i}" for i in range(11, n + 1)]
    assert store.stats.deleted_partitions == 2


def test_compacted_parts_left_behind_are_removed_on_open(tmp_path: Path) -> None:
    clock = Clock(datetime(2024, 5, 1, 10, 0, tzinfo=UTC))
    store = FlowStore(tmp_path, clock=clock)
    store.commit(_batches(1, 2), Checkpoint())
    store.commit(_batches(3, 2), Checkpoint())
    hour = store.files()[0].parent
    kept = [f.read_bytes() for f in store.files()]
    clock.t += timedelta(hours=1)
    store.compact()
    # Killed after the merged file was written, before the parts were deleted.
    for i, data in enumerate(kept, 1):
        (hour / f"part-{i:012d}.parquet").write_bytes(data)
    assert _paths(FlowStore(tmp_path)) == [f"/status/{i}" for i in range(1, 5)]


def test_publisher_swaps_whole_generations(tmp_path: Path) -> None:
    pub = Publisher(tmp_path)
    stop = threading.Event()
    seen: list[tuple[str, str]] = []
    errors: list[str] = []

    def write(n: int) -> None:
        def fill(out: Path) -> None:
            big = f"generation {n}\n" + "x" * 200_000
            (out / "graph.json").write_text(json.dumps({"n": n, "pad": big}))
            (out / "report.md").write_text(big)
            (out / "policies").mkdir()
            (out / "policies" / "a.yaml").write_text(f"n: {n}\n")
        pub.publish(fill)

    def reader() -> None:
        while not stop.is_set():
            try:
                graph = (tmp_path / "graph.json").read_text()
                report = (tmp_path / "report.md").read_text()
            except FileNotFoundError:
                continue  # before the first generation
            try:
                n = json.loads(graph)["n"]
            except ValueError:
                errors.append("partial graph.json")
                continue
            if not report.endswith("x" * 1000) or not report.startswith("generation "):
                errors.append("partial report.md")
            seen.append((str(n), report.split("\n", 1)[0]))

    t = threading.Thread(target=reader)
    t.start()
    for n in range(1, 30):
        write(n)
    stop.set()
    t.join()
    assert not errors
    assert seen  # the reader did read while generations were being published
    assert json.loads((tmp_path / "graph.json").read_text())["n"] == 29
    assert (tmp_path / "policies" / "a.yaml").read_text() == "n: 29\n"
    assert len(pub.generations()) == 3
    assert os.readlink(tmp_path / "current") == os.path.join("emit", "00000029")


def test_publisher_drops_a_half_written_generation(tmp_path: Path) -> None:
    pub = Publisher(tmp_path)
    def first(out: Path) -> None:
        (out / "graph.json").write_text("{}")

    pub.publish(first)

    def boom(out: Path) -> None:
        (out / "graph.json").write_text("{")
        raise OSError("disk full")

    with pytest.raises(OSError):
        pub.publish(boom)
    assert (tmp_path / "graph.json").read_text() == "{}"
    assert Publisher(tmp_path).generations() == ["00000001"]
    assert not [p for p in (tmp_path / "emit").iterdir() if p.name.startswith(".")]


def test_edge_summary_sums_and_widens(tmp_path: Path) -> None:
    merge_edge_summary(tmp_path, [
        {"source": "a", "destination": "b", "port": 80, "protocol": "http", "requests": 3,
         "first_seen": "2024-05-01T10:00:00", "last_seen": "2024-05-01T11:00:00"}])
    out = merge_edge_summary(tmp_path, [
        {"source": "a", "destination": "b", "port": 80, "protocol": "http", "requests": 4,
         "first_seen": "2024-05-01T09:00:00", "last_seen": "2024-05-01T10:30:00"},
        {"source": "c", "destination": "b", "port": 80, "protocol": "tcp", "requests": 1,
         "first_seen": None, "last_seen": None}])
    assert out["edges"][0] == {"source": "a", "destination": "b", "port": 80,
                               "protocol": "http", "requests": 7,
                               "first_seen": "2024-05-01T09:00:00",
                               "last_seen": "2024-05-01T11:00:00"}
    assert json.loads((tmp_path / "edges-summary.json").read_text()) == out


def test_inventory_file_keeps_every_kind_and_old_files_still_load(tmp_path: Path) -> None:
    rvs: dict[tuple[str, str | None], str] = {
        ("pods", "foo"): "12", ("services", "foo"): "10", ("namespaces", "foo"): "3"}
    objects = [{"kind": "Service", "apiVersion": "v1",
                "metadata": {"name": "web", "namespace": "foo"}, "spec": {"ports": [
                    {"port": 80}]}},
               {"kind": "ServiceAccount", "apiVersion": "v1", "metadata": {
                   "name": "gone", "namespace": "foo",
                   "deletionTimestamp": "2024-05-01T10:00:00Z"}}]
    store = FlowStore(tmp_path)
    store.commit([], Checkpoint(resource_versions=rvs, pods=[{"metadata": {"uid": "a"}}],
                                objects=objects))
    # A commit without inventory carries the objects over with the rest.
    store.commit([], Checkpoint(objects=[{"kind": "ignored"}]), inventory=False)
    ckpt = FlowStore(tmp_path).checkpoint
    assert (ckpt.resource_versions, ckpt.objects, ckpt.inventory_version) == (
        rvs, objects, INVENTORY_VERSION)
    assert ckpt.pods_file is not None
    inventory_file = tmp_path / ckpt.pods_file
    doc = json.loads(inventory_file.read_text())
    assert doc["version"] == 2
    # What version 1 wrote: no version, no objects. Loads, marked as such (the observer then
    # lists the kinds it lacks).
    inventory_file.write_text(json.dumps(
        {"resource_versions": doc["resource_versions"], "pods": doc["pods"]}))
    old = FlowStore(tmp_path).checkpoint
    assert (old.inventory_version, old.objects, old.resource_versions) == (1, [], rvs)
    # A newer version than this one knows is refused, not misread.
    inventory_file.write_text(json.dumps(
        {**doc, "version": INVENTORY_VERSION + 1}))
    with pytest.raises(InputError, match="unknown inventory version"):
        FlowStore(tmp_path)


def test_committed_files_for_a_learner_while_commits_go_on(tmp_path: Path) -> None:
    clock = Clock(datetime(2024, 5, 1, 10, 0, tzinfo=UTC))
    store = FlowStore(tmp_path, clock=clock)
    for i in range(3):  # parts 1-3 in hour 10
        store.commit(_batches(2 * i + 1, 2), Checkpoint())
    clock.t += timedelta(hours=1)
    store.commit(_batches(7, 2), Checkpoint())  # part 4 in hour 11
    (hour10,) = store.finished_hours()
    parts10 = sorted(hour10.iterdir())
    saved = {f.name: f.read_bytes() for f in parts10}
    # The learner's view as of seq 3: hour 11's part 4 is newer, left out.
    assert [f.name for f in committed_files(store._hours(), upto=3)] == [f.name for f in parts10]
    assert compact_hour(hour10) == 3
    # A merge cut short: the merged file and two of its parts (their deletion never came).
    for name in list(saved)[:2]:
        (hour10 / name).write_bytes(saved[name])
    (hour10 / ".compact-x.parquet.123.tmp").write_bytes(b"half")  # being written: not listed
    assert [f.name for f in committed_files(store._hours(), upto=4)] == [
        "compact-000000000001-000000000003.parquet", "part-000000000004.parquet"]
    assert _paths(store) == [f"/status/{i}" for i in range(1, 9)]
    # The next merge of the hour removes the leftovers instead of merging them again.
    assert compact_hour(hour10) == 0
    assert sorted(f.name for f in hour10.iterdir() if not f.name.startswith(".")) == [
        "compact-000000000001-000000000003.parquet"]
