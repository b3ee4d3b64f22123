"""What the teacher tells the student: one interface (`base.TeacherSource`), one file per source.

    base.py          the signals (DenseLogits, HiddenAndHead, TopKRows), TeacherQuery, TeacherSource
    live.py          a frozen model in memory: logits, or hidden states + output layer (chunked), hidden states
                     and attention maps
    topk_cache.py    the top-k cache read back (`kdistill cache` writes it with cache_writer.py; format:
                     topk_codec.py, topk_store.py, topk_writer.py)
    embeddings.py    teacher sentence embeddings computed once before training

Objectives ask a source for what they need and dispatch on what they get; the trainer checks before training
that the source can give what every objective asks (`TeacherSource.provides`).
"""

from kdistill.teachers.base import (DenseLogits, HiddenAndHead, TeacherQuery, TeacherSignalError, TeacherSource,
                                    TopKRows)
from kdistill.teachers.embeddings import PrecomputedEmbeddings
from kdistill.teachers.live import LiveTeacher
from kdistill.teachers.topk_cache import CachedTopK

__all__ = ["CachedTopK", "DenseLogits", "HiddenAndHead", "LiveTeacher", "PrecomputedEmbeddings", "TeacherQuery",
           "TeacherSignalError", "TeacherSource", "TopKRows"]
