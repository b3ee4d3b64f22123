"""The sections of a run configuration: one YAML file <-> these nested dataclasses.

Every field carries its help text, default and allowed values here (objective fields: in each objective's
config, `kdistill.objectives`), and nowhere else.

Sections:
    teacher     the model that provides the signal (omit for plain fine-tuning)
    student     the model that is trained
    data        where examples come from and how they become tokens
    objectives  name -> settings; the total loss is sum(weight * objective)
    lora        optional LoRA adapters on the student (peft)
    on_policy   optional: the student generates, the teacher scores (GKD / on-policy distillation)
    distributed how several processes share the work: data parallel (ddp), FSDP2 (fsdp) or ZeRO-3 (deepspeed)
    training    any `transformers.TrainingArguments` field (output_dir, learning_rate, ...)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdistill.fields import Checked, option
from kdistill.objectives import ObjectiveConfig
from kdistill.objectives.ce import CrossEntropyConfig
from kdistill.objectives.kd import LogitKDConfig

__all__ = ["CONFIG_FILENAME", "CacheConfig", "ChunkedLossConfig", "DataConfig", "DistributedConfig", "EmbeddingConfig", "LoraConfig",
           "ModelConfig", "OnPolicyConfig", "RunConfig", "ServerConfig", "StepByStepConfig", "TeacherConfig",
           "default_objectives"]

CONFIG_FILENAME = "kdistill_config.yaml"


@dataclass
class ModelConfig(Checked):
    """A model to load with `from_pretrained` (hub id or local folder)."""

    name_or_path: str | None = option(None, "Hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct) or local folder.")
    tokenizer: str | None = option(None, "Tokenizer hub id or folder; default: name_or_path.")
    dtype: str = option("auto", "Weights dtype.", ("auto", "float32", "bfloat16", "float16"))
    device_map: str | None = option(
        None, "Teacher only: 'auto' spreads a large teacher over the visible GPUs (accelerate device map); "
              "default: the student's device.")
    revision: str | None = option(None, "Hub revision (branch, tag or commit).")
    trust_remote_code: bool = option(False, "Allow model code from the hub repository.")
    attn_implementation: str | None = option(None, "e.g. sdpa, eager, flash_attention_2; default: transformers' choice.")
    layers: list[int] | None = option(None, "Keep only these layer indices after loading (shrink a teacher into a "
                                      "student), e.g. [0, 2, 4] of 6. T5: encoder and decoder blocks.")


@dataclass
class ServerConfig(Checked):
    """A teacher behind an OpenAI-compatible completions endpoint that returns the top-k log-probs of given token
    ids (vLLM's `prompt_logprobs`; `kdistill serve-teacher`). Token ids are sent, never re-tokenised text."""

    url: str | None = option(None, "Base URL of the API, e.g. http://127.0.0.1:8000/v1.")
    model: str | None = option(None, "The served model's name (what /v1/models lists).")
    top_k: int = option(20, "Log-probs per position to request (vLLM caps them with --max-logprobs, default 20).",
                        ge=1)
    api: str = option("vllm", "Response shape: vllm = choices[i].prompt_logprobs.", ("vllm",))
    batch_size: int = option(8, "Sequences per request.", ge=1)
    max_concurrency: int = option(4, "Requests in flight at once.", ge=1)
    timeout: float = option(120.0, "Seconds per request before it is retried.", gt=0)
    max_retries: int = option(5, "Retries of a request (connection errors, timeouts, 429, 5xx) before the run stops; "
                              "its checkpoints stay and it resumes when restarted.", ge=0)
    api_key_env: str | None = option(None, "Environment variable holding the API key (sent as a bearer token; "
                                     "never written anywhere), e.g. VLLM_API_KEY; none by default.")


@dataclass
class TeacherConfig(ModelConfig):
    """The teacher: a model to load, or (with `server`) a model served over HTTP."""

    server: ServerConfig | None = option(None, "Query a served teacher instead of loading one: {url, model, top_k}. "
                                         "name_or_path/tokenizer may still name the teacher for records.")


@dataclass
class DataConfig(Checked):
    """Where the examples come from and how they are tokenised."""

    train: str | None = option(None, "Training data: a .jsonl/.json file or a datasets hub id.")
    eval: str | None = option(None, "Optional held-out data (same formats).")
    format: str = option("auto", "Row format; auto detects per row.",
                         ("auto", "alpaca", "prompt_completion", "messages", "triplet", "pair_score", "sentence"))
    subset: str | None = option(None, "Hub dataset configuration (subset) when train/eval is a hub id, e.g. triplet "
                                  "for sentence-transformers/all-nli.")
    split: str = option("train", "Split to load when `train` is a hub id.")
    eval_split: str = option("validation", "Split to load when `eval` is a hub id.")
    template: str = option("auto", "Prompt rendering: auto = chat template if the tokenizer has one, else the Alpaca "
                           "prompt (prompt/completion rows are raw text).", ("auto", "chat", "alpaca", "plain"))
    max_length: int = option(512, "Maximum tokens per example (causal: prompt+response; seq2seq: source).", ge=1)
    max_target_length: int | None = option(None, "Seq2seq only: maximum target tokens (default: max_length).", ge=1)
    skip_invalid: bool = option(False, "Skip invalid rows (reported and counted) instead of refusing to start.")
    limit: int | None = option(None, "Use only the first N valid training examples.", ge=1)
    eval_limit: int | None = option(None, "Use only the first N valid eval examples.", ge=1)


@dataclass
class LoraConfig(Checked):
    """LoRA adapters on the student, through peft."""

    enabled: bool = option(False, "Train LoRA adapters instead of all student weights.")
    r: int = option(16, "LoRA rank.", ge=1)
    alpha: int = option(32, "LoRA scaling numerator (lora_alpha).")
    dropout: float = option(0.05, "Dropout on the LoRA path.", ge=0)
    target_modules: Any = option("all-linear", "Module names (list) or 'all-linear'.")
    merge: bool = option(False, "Save the student with adapters merged into the weights (also saves the adapter "
                         "under adapter/).")


@dataclass
class EmbeddingConfig(Checked):
    """task: embedding. How a model turns text into one vector."""

    pooling: str = option("auto", "auto: the saved sentence-transformers setting, else eos for decoder LMs and mean "
                          "for encoders.", ("auto", "mean", "cls", "eos"))
    normalize: bool = option(True, "L2-normalise embeddings.")
    append_eos: bool | None = option(None, "Append EOS to every text (default: when pooling is eos).")
    max_length: int = option(256, "Maximum tokens per text.", ge=1)
    encode_batch_size: int = option(128, "Batch size for encoding (teacher signals, evaluation).", ge=1)


@dataclass
class StepByStepConfig(Checked):
    """Distilling step-by-step (Hsieh et al., 2023): train on the label and on the LLM's rationale."""

    dataset: str | None = option(None, "Converter for data.train/data.eval: esnli | anli | cqa | svamp | generic "
                                 "({input, label, rationale}); empty = not a step-by-step run.",
                                 (None, "esnli", "anli", "cqa", "svamp", "generic"))
    label_type: str = option("gt", "Train the label view on ground-truth labels (gt) or the LLM's labels (llm).",
                             ("gt", "llm"))
    model_type: str = option("task_prefix", "task_prefix: label and rationale views with prefixes; standard: the "
                             "label view only, no prefix (plain fine-tuning).", ("task_prefix", "standard"))
    label_prefix: str = option("[label] ", "Prefix of the label view's input.")
    rationale_prefix: str = option("[rationale] ", "Prefix of the rationale view's input.")
    prompt_suffix: str | None = option(None, "Text between a view's input and its target: default a newline for causal "
                                       "LMs (the answer starts on its own line), nothing for encoder-decoder models.")
    max_new_tokens: int = option(32, "Evaluation: tokens generated for a label.", ge=1)
    eval_batch_size: int = option(32, "Evaluation: generation batch size.", ge=1)


@dataclass
class ChunkedLossConfig(Checked):
    """Token losses (ce, kd) computed from hidden states a chunk of positions at a time, never holding the
    (tokens x vocabulary) logits of student or teacher."""

    mode: str = option("auto", "auto: chunked when the vocabulary has >= min_vocab entries and the models' logits are "
                       "plain hidden @ lm_head (checked on a probe input; soft-capped logits or LoRA on lm_head fall "
                       "back to dense); on: chunked or an error; off: dense logits.", ("auto", "on", "off"))
    chunk_size: int | str = option("auto", "Positions projected to the vocabulary at a time; auto: as many as keep one "
                                   "chunk's working set within 1 GiB, from the vocabulary size, hidden sizes and dtype "
                                   "(kdistill.losses.chunked.auto_chunk_size).")
    min_vocab: int = option(32768, "auto: the smallest vocabulary that is chunked.", ge=1)


@dataclass
class CacheConfig(Checked):
    """A top-k teacher cache: `kdistill cache` runs the teacher once and stores its k most likely tokens per
    trained token; `kdistill train` then reads them and loads no teacher model."""

    dir: str | None = option(None, "Cache folder (train/ and eval/ inside). Set it to train from the cache.")
    k: int = option(64, "Token ids kept per position.")
    temperature: float = option(1.0, "Capture temperature: stored log-probs are log_softmax(teacher logits / T). A kd "
                                "objective with missing: bucket must train at this temperature.")
    logprob_bits: int = option(12, "Bits per stored log-prob (4..16); ids take ceil(log2 V) bits.")
    batch_size: int = option(8, "Examples per teacher forward pass while caching.", ge=1)
    kl_sample_tokens: int = option(4096, "Tokens on which KL(full teacher || reconstructed top-k) is measured.", ge=0)
    shard_mb: int = option(256, "Shard file size.", ge=1)


@dataclass
class OnPolicyConfig(Checked):
    """On-policy distillation: on a share `lmbda` of the optimizer steps the student generates answers to the
    batch's prompts with its current weights and the teacher scores them (GKD, Agarwal et al. 2024; on-policy
    distillation with a per-token reverse-KL advantage, Thinking Machines 2025). The section's presence turns it
    on; `objectives` must be terms that can score samples (kd)."""

    lmbda: float = option(1.0, "Probability that an optimizer step trains on student samples (the same coin flip on "
                          "every process); the other steps train on the dataset's responses, or on teacher samples "
                          "with seq_kd. 0 = off-policy training.", ge=0, le=1)
    seq_kd: bool = option(False, "GKD's SeqKD variant: the steps that are not on-policy train on answers the "
                          "teacher samples (same sampling settings) instead of the dataset's responses.")
    max_new_tokens: int = option(128, "Most tokens sampled per answer; a longer answer is cut there (trained "
                                 "without an end token) and counted as truncated. Answers come on top of "
                                 "data.max_length, which bounds the prompt.", ge=1)
    temperature: float = option(1.0, "SAMPLING temperature (the loss temperature stays objectives.kd.temperature).",
                                gt=0)
    top_p: float = option(1.0, "Nucleus sampling: keep the smallest set of tokens with this much probability.",
                          gt=0, le=1)
    top_k: int | None = option(None, "Sample among the k most likely tokens only (default: all).", ge=1)
    mode: str = option("divergence", "divergence: objectives.kd's divergence over the full vocabulary at every "
                       "sampled position (GKD). sampled_token: the per-token advantage log p_teacher(x_t) - "
                       "log p_student(x_t) on the sampled tokens, trained as a policy gradient (needs only the "
                       "teacher's log-prob of each sampled token).", ("divergence", "sampled_token"))
    discount: float = option(0.0, "sampled_token: the advantage of token t adds the later tokens' log-ratios "
                             "discounted by this factor per step (0: each token's own; 1: the sequence-level "
                             "reverse KL's gradient).", ge=0, le=1)
    backend: str = option("hf", "Who generates: hf = the model's own `generate` (transformers), batched, on the "
                          "training device.", ("hf",))
    stop_at_turn_end: bool = option(True, "Also end an answer at the chat template's end-of-turn token (<|im_end|>, "
                                    "<|eot_id|>, ...) when it differs from EOS.")


@dataclass
class DistributedConfig(Checked):
    """How the processes of a multi-process launch (`accelerate launch`, `torchrun`) share the work. One process
    ignores it. ddp: every process holds the whole student and teacher. fsdp: FSDP2 (`fully_shard`): the student's
    parameters, gradients and optimizer state are split over the processes, and a live teacher's weights too (it is
    only run forward: no gradients, no optimizer state, each layer resharded after its forward). deepspeed: ZeRO-3
    through the Trainer's DeepSpeed integration, the live teacher a second, inference-only engine (no optimizer)."""

    strategy: str = option("ddp", "ddp: data parallel (whole models on every process); fsdp: FSDP2 sharding of the "
                           "student and the live teacher; deepspeed: DeepSpeed ZeRO-3 partitioning of both (needs "
                           "the deepspeed package).", ("ddp", "fsdp", "deepspeed"))
    layer_classes: list[str] | None = option(None, "fsdp: class names of the blocks that become one shard unit each "
                                             "(e.g. [Qwen2DecoderLayer]); default: each model's own "
                                             "_no_split_modules (its transformer block).")
    shard_teacher: bool = option(True, "fsdp, deepspeed: shard the live teacher over the processes too (false: "
                                 "every process holds the whole teacher, as with ddp).")
    deepspeed_config: str | None = option(None, "deepspeed: a DeepSpeed JSON config (ZeRO stage 3) used for the "
                                          "student and the teacher engine instead of the generated one "
                                          "(stage 3, batch sizes, clipping and precision 'auto' from training).")
    reshard_after_forward: bool = option(True, "fsdp: free each student block's gathered weights after its forward "
                                         "and gather them again for backward (less memory, one more all-gather "
                                         "per block); false keeps them until backward.")
    checkpoint: str = option("sharded", "fsdp: how checkpoint-* folders hold the weights and optimizer state: "
                             "sharded (each process writes its own part, torch.distributed.checkpoint) or full "
                             "(gathered into one file). The exported student is always one save_pretrained folder.",
                             ("sharded", "full"))


def default_objectives() -> dict[str, ObjectiveConfig]:
    """ce 0.5 + kd (forward KL) 0.5: what a run without an `objectives` section trains."""
    return {"ce": CrossEntropyConfig(type="ce", weight=0.5), "kd": LogitKDConfig(type="kd", weight=0.5)}


def _default_training() -> dict[str, Any]:
    return {"output_dir": "outputs/kdistill"}


@dataclass
class RunConfig(Checked):
    """A whole training run."""

    task: str = option("lm", "lm: language modelling objectives on token labels (ce, kd); embedding: one vector per "
                       "text (contrastive, embedding_kd).", ("lm", "embedding"))
    student: ModelConfig = option(help="The model that is trained.", factory=ModelConfig)
    teacher: TeacherConfig = option(help="The model that provides the signal; leave name_or_path (and server) "
                                    "empty for no teacher.", factory=TeacherConfig)
    data: DataConfig = option(help="Training (and eval) data.", factory=DataConfig)
    objectives: dict[str, ObjectiveConfig] = option(
        help="Loss terms, name -> settings; total = sum(weight * term). Default: ce 0.5 + kd (forward_kl) 0.5.",
        factory=default_objectives)
    lora: LoraConfig = option(help="LoRA on the student.", factory=LoraConfig)
    on_policy: OnPolicyConfig | None = option(None, "On-policy distillation: the student generates, the teacher "
                                              "scores (absent: off-policy training on the dataset's text).")
    embedding: EmbeddingConfig = option(help="task: embedding: pooling and text length.", factory=EmbeddingConfig)
    stepbystep: StepByStepConfig = option(help="Distilling step-by-step data and evaluation.",
                                          factory=StepByStepConfig)
    chunked_loss: ChunkedLossConfig = option(help="Memory-efficient ce/kd for large vocabularies.",
                                             factory=ChunkedLossConfig)
    cache: CacheConfig = option(help="Top-k teacher cache (kdistill cache).", factory=CacheConfig)
    distributed: DistributedConfig = option(help="Multi-process training: ddp, FSDP2 (fsdp) or ZeRO-3 (deepspeed).",
                                            factory=DistributedConfig)
    training: dict[str, Any] = option(
        help="transformers.TrainingArguments fields (output_dir, learning_rate, max_steps, ...).",
        factory=_default_training)
    seed: int = option(42, "Random seed (also passed to TrainingArguments unless set there).")
