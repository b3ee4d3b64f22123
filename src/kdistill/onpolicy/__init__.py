"""On-policy distillation: the student (or, with seq_kd, the teacher) answers the batch's prompts during training
and the objectives score those answers. `step` decides and samples per optimizer step, `samples` turns prompts
and answers into micro-batches, `generation` is the generation backend."""

from kdistill.onpolicy.generation import GenerationBackend, HFGenerate, SamplingParams, SeededSampling, row_seed
from kdistill.onpolicy.samples import SampleStats, answer_lengths, left_padded_prompts, sampled_batch
from kdistill.onpolicy.step import OnPolicy, stop_ids_for

__all__ = ["GenerationBackend", "HFGenerate", "OnPolicy", "SampleStats", "SamplingParams", "SeededSampling",
           "answer_lengths", "left_padded_prompts", "row_seed", "sampled_batch", "stop_ids_for"]
