"""Long jobs that must never lose work: an append-only, resumable JSON Lines record store, content keys,
timestamps, and one bounded concurrent runner. Shared by annotate, generate and judge."""

from .runner import in_batches, run_concurrent
from .store import STATUSES, RecordWriter, content_key, iter_records, load_records, now

__all__ = ["STATUSES", "RecordWriter", "content_key", "in_batches", "iter_records", "load_records", "now",
           "run_concurrent"]
