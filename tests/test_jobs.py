"""kdistill.jobs: the append-only record store, content keys and the bounded concurrent runner."""

import json
import threading
import time

import pytest

from kdistill.jobs import RecordWriter, content_key, in_batches, iter_records, load_records, now, run_concurrent


def test_content_key_is_canonical():
    assert content_key({"a": 1, "b": [1, "é"]}) == content_key({"b": [1, "é"], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})
    assert len(content_key({})) == 64
    assert now().endswith("+00:00")


def test_store_last_record_wins_and_cut_lines_are_counted(tmp_path, caplog):
    path = tmp_path / "sub" / "r.jsonl"
    with RecordWriter(path) as writer:
        writer.write({"key": "a", "status": "failed"})
        writer.write({"key": "b", "status": "ok"})
        writer.write({"key": "a", "status": "ok"})
    with path.open("ab") as fh:
        fh.write(b'{"key": "c", "sta')  # a line cut short by a kill
    writer = RecordWriter(path)  # ends the cut line, so the next record is a line of its own
    writer.write({"key": "d", "status": "unparsable"})
    writer.close()
    with path.open("a") as fh:
        fh.write(json.dumps({"key": "e", "status": "other"}) + "\n\n")
    counts = {}
    records = load_records(path, counts)
    assert list(records) == ["a", "b", "d"] and records["a"]["status"] == "ok"
    assert counts == {"lines": 6, "unreadable": 2}
    assert f"{path}:4: ignoring an unreadable annotation record" in caplog.text
    assert [r["key"] for r in iter_records(path)] == ["a", "b", "a", "d"]
    assert load_records(tmp_path / "missing.jsonl") == {}


def test_runner_bounds_concurrency_and_stops_on_request():
    lock, active, peak = threading.Lock(), [0], [0]

    def work(job):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.01)
        with lock:
            active[0] -= 1
        return job * 10

    seen = []
    run_concurrent(list(range(20)), work, lambda job, result: seen.append((job, result)), 3)
    assert sorted(seen) == [(i, i * 10) for i in range(20)] and peak[0] <= 3

    seen.clear()
    run_concurrent(list(range(20)), work, lambda job, result: seen.append(job) or len(seen) >= 2, 2)
    assert 2 <= len(seen) <= 3  # the job still in flight when the stop came is finished and handed over


def test_runner_raises_the_work_error_and_checks_arguments():
    def work(job):
        raise KeyError(job)

    with pytest.raises(KeyError):
        run_concurrent([1, 2], work, lambda job, result: None, 2)
    with pytest.raises(ValueError, match="concurrency"):
        run_concurrent([1], work, lambda job, result: None, 0)
    assert list(in_batches([1, 2, 3, 4, 5], 2)) == [[1, 2], [3, 4], [5]]
