"""Models: loading teacher and student (`loader`), comparing their tokenizers and aligning vocabularies
(`tokenizers`), shrinking to a subset of layers (`shrink`), LoRA (`lora`), saving the student (`save`), and the
output layer and causal shift that training, caching and evaluation share (`heads`)."""

from kdistill.models.heads import (OutputHead, align_positions, base_model, chunking_problem, lm_model_inputs,
                                   output_layer, output_layer_bypassed, shifted_targets)
from kdistill.models.loader import (DTYPES, GENERATIVE_SUFFIXES, ModelUnavailableError, hub_kwargs,
                                    is_encoder_decoder, lm_class, load_model, load_pretrained, pretrained_config,
                                    require_generative)
from kdistill.models.lora import LORA_TASK_TYPES, apply_lora
from kdistill.models.save import load_student, save_student
from kdistill.models.shrink import shrink
from kdistill.models.tokenizers import VocabularyMismatchError, compare_tokenizers, kd_vocab_size, load_tokenizer


__all__ = ["DTYPES", "GENERATIVE_SUFFIXES", "LORA_TASK_TYPES", "ModelUnavailableError", "OutputHead",
           "VocabularyMismatchError", "align_positions", "apply_lora", "base_model", "chunking_problem",
           "compare_tokenizers", "hub_kwargs", "is_encoder_decoder", "kd_vocab_size", "lm_class", "lm_model_inputs",
           "load_model", "load_pretrained", "load_student", "load_tokenizer", "output_layer", "output_layer_bypassed",
           "pretrained_config", "require_generative", "save_student", "shifted_targets", "shrink"]
