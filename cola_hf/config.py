"""Every option of a CoLA run, as `HfArgumentParser` dataclasses, bundled as one `RunOptions`, and what each is.

The defaults of these dataclasses ARE the tutorial's recipe: this file is its one source of truth.
`experiments/recipes/tutorial.yaml` spells the same values out for readers, and a test checks that
the two never drift apart. What each option is for (`OPTION_ROLES`) is said once, here; the run's name, the
options as results.json, W&B and a recipe record them, and the flags' types are derived here too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
from argparse import ArgumentTypeError
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.hf_argparser import string_to_bool

from cola_hf.data.annotations import ANNOTATIONS_URL
from cola_hf.data.sources import BLIMP_URL, COLA_URL
from cola_hf.errors import UsageError
from cola_hf.file_io import read_yaml
from cola_hf.redaction import redact_options

DEFAULT_MODEL = "bert-base-uncased"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "Hub id or local directory of the checkpoint to fine-tune (or to evaluate)."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded checkpoints are cached."})
    base_model: str | None = field(
        default=None,
        metadata={"help": "Hub id the model card names as base_model when model_name_or_path is a local directory."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run modelling code shipped with the checkpoint. Off unless you trust it."}
    )


@dataclass
class DataArguments:
    cola_source: str = field(
        default=COLA_URL,
        metadata={"help": "The CoLA 1.1 zip (URL or local path) or a directory holding its raw TSV files."},
    )
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Share of in_domain_train held out for validation (the tutorial's 90/10)."}
    )
    max_seq_length: int = field(default=64, metadata={"help": "Truncate tokenized sentences to this many tokens."})
    pad_to_max_length: bool = field(
        default=False,
        metadata={"help": "Pad every sentence to max_seq_length like the tutorial, instead of per batch."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training sentences (quick trials)."}
    )
    annotations_source: str | None = field(
        default=ANNOTATIONS_URL,
        metadata={
            "help": "CoLA's grammatical-phenomena annotation of the GLUE dev set (URL, local zip or directory), "
            "for the per-phenomenon analysis; 'none' skips it."
        },
    )
    minor_features: bool = field(
        default=False, metadata={"help": "Analyse the 63 minor grammatical features too, not only the 15 major."}
    )
    blimp_source: str | None = field(
        default=BLIMP_URL,
        metadata={
            "help": "BLiMP's 67,000 minimal pairs, scored after the test sets (the authors' zip by URL, a local "
            "copy, or a directory of its .jsonl files); 'none' skips them."
        },
    )
    explain_pairs: int = field(
        default=1,  # integrated gradients on 134 + 10 sentences: about a tenth of a MiniLM run (docs/analysis.md)
        metadata={
            "help": "Explain the model's judgments word by word (explanations.html, explanations.json) on this "
            "many BLiMP pairs per paradigm (seeded) and the test sets' most confidently wrong sentences; 0 skips it."
        },
    )
    explain_method: str = field(
        default="integrated_gradients",
        metadata={
            "help": "How words are scored: integrated gradients on the input embeddings, or gradient x input "
            "(one backward pass, no completeness guarantee).",
            "choices": ["integrated_gradients", "gradient_x_input"],
        },
    )


@dataclass
class ColaTrainingArguments(TrainingArguments):
    """`TrainingArguments` whose defaults are the tutorial's optimiser, schedule and loop."""

    output_dir: str | None = field(default="outputs/cola", metadata={"help": "Where every output is written."})
    do_train: bool = field(default=True, metadata={"help": "Fine-tune; with False, only evaluate the test sets."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Write over an output_dir that already holds a finished run."}
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "Insist on continuing from the latest complete checkpoint in output_dir (an unfinished run "
            "continues from it anyway; this makes a missing checkpoint an error)."
        },
    )
    # The tutorial: torch AdamW(lr=2e-5, eps=1e-8), no weight decay, linear decay to 0 with no warmup,
    # gradient norm clipped at 1.0, batch 32, 4 epochs, seed 42, validation after every epoch.
    # Fused: torch AdamW's update in one kernel per step instead of a loop over the parameter tensors, and the
    # Trainer's own default. tests/test_exactness.py checks it against the tutorial's loop; on the CPU it cuts
    # an epoch by a sixth (README, Performance). `adamw_torch` is the unfused loop.
    optim: str = field(
        default="adamw_torch_fused", metadata={"help": "Optimizer: torch AdamW, fused (adamw_torch: unfused)."}
    )
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate for AdamW."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "Epsilon for AdamW."})
    adam_beta1: float = field(default=0.9, metadata={"help": "Beta1 for AdamW."})
    adam_beta2: float = field(default=0.999, metadata={"help": "Beta2 for AdamW."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay (the tutorial uses none)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=0, metadata={"help": "Warmup steps (the tutorial uses none)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clipping."})
    # Stable fine-tuning (docs/stable-fine-tuning.md). At these defaults none of it acts: the tutorial's optimizer.
    layerwise_lr_decay: float = field(
        default=1.0,
        metadata={
            "help": "Layer-wise learning-rate decay (ELECTRA): the head at learning_rate, each encoder layer below "
            "it times one more power of this, the embeddings lowest; 1.0: one rate for all."
        },
    )
    reinit_top_layers: int = field(
        default=0,
        metadata={
            "help": "Re-initialise the top N encoder layers (and the pooler) from the run's seed before training "
            "(Zhang et al. 2021)."
        },
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "With --load_best_model_at_end: stop after this many validations without a better MCC "
            "(Mosbach et al. 2021); default: train every epoch."
        },
    )
    # Scale-out: the recipe fixes the GLOBAL batch; the per-device batch and accumulation follow from the
    # number of processes (see resolve_batch_layout below and the README's "Scaling out").
    global_train_batch_size: int = field(
        default=32,
        metadata={
            "help": "Sentences per optimizer step over all processes (the tutorial's 32). The per-device batch "
            "and gradient accumulation are derived from it and the world size; 0 uses "
            "per_device_train_batch_size and gradient_accumulation_steps as given."
        },
    )
    per_device_train_batch_size: int = field(
        default=32,
        metadata={"help": "Most training sentences one device holds at once (with global_train_batch_size)."},
    )
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Evaluation batch size per device."})
    num_train_epochs: float = field(default=4.0, metadata={"help": "Training epochs."})
    seed: int = field(default=42, metadata={"help": "Seed for the split, model head, dropout and batch order."})
    eval_strategy: str = field(default="epoch", metadata={"help": "Validate after every epoch."})
    save_strategy: str = field(default="epoch", metadata={"help": "Checkpoint after every epoch (resumable)."})
    save_total_limit: int | None = field(default=1, metadata={"help": "Checkpoints kept in output_dir."})
    logging_strategy: str = field(default="steps", metadata={"help": "Log the training loss every logging_steps."})
    logging_steps: float = field(default=10, metadata={"help": "Steps between training-loss logs."})
    # Stop on a NaN loss (see trainer.py) instead of hiding it from the logs.
    logging_nan_inf_filter: bool = field(default=False, metadata={"help": "Hide NaN/inf losses from logs."})
    # Length grouping is a speed lever that changes the batches: sentences of similar length share a step, which
    # pads less, but that is another draw of batches than the tutorial's random ones, not its optimisation step for
    # step. Over seeds the two end alike (measured: experiments/recipes/tutorial.yaml). Either way each epoch's
    # order is a function of the seed and the epoch (training/sampler.py).
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={
            "help": "Training batches: 'group_by_length' (similar lengths together: faster, other batches than the "
            "tutorial's), 'random' (the tutorial's), or 'sequential'.",
            # Orders the package's sampler (training/sampler.py) makes exact on resume and on N processes; not
            # transformers' batch_rebalance.
            "choices": ["group_by_length", "random", "sequential"],
        },
    )
    # A speed lever that keeps the recipe's math (see README, Performance).
    dataloader_num_workers: int | None = field(
        default=None,
        metadata={
            "help": "Processes that collate batches. Default: 2 with a GPU, so batches are ready while it computes; "
            "0 on the CPU, where workers would take cores from the model."
        },
    )
    hub_strategy: str = field(
        default="end",
        metadata={
            "help": "When --push_to_hub publishes: 'end', once the run has finished, with its model card (the only "
            "strategy cola-hf accepts: a checkpoint pushed mid-run would have no card, and stays local instead)."
        },
    )
    report_to: None | str | list[str] = field(
        default="wandb",
        metadata={"help": "Where to report: 'wandb' (offline on its own without credentials or network) or 'none'."},
    )

    def __post_init__(self) -> None:
        if self.load_best_model_at_end and self.metric_for_best_model is None:
            self.metric_for_best_model = "matthews_correlation"  # the best epoch is CoLA's, not the lowest loss
        if self.early_stopping_patience is not None and not self.load_best_model_at_end:
            raise UsageError(
                f"--early_stopping_patience {self.early_stopping_patience} needs --load_best_model_at_end true: "
                "stopping early keeps the best epoch, not the last"
            )
        # --use_cpu on a GPU machine: pinning would open a CUDA context on GPU 0 in every process, for nothing.
        on_gpu = torch.cuda.is_available() and not self.use_cpu
        if not on_gpu:
            self.dataloader_pin_memory = False  # pinning only helps copies to a GPU
        if self.dataloader_num_workers is None:
            self.dataloader_num_workers = 2 if on_gpu else 0
            self.dataloader_persistent_workers = on_gpu  # not restarted every epoch
        self.adopt_launcher_precision()
        super().__post_init__()
        if on_gpu and self.dataloader_pin_memory:
            # From pinned memory the batch's copy to the GPU overlaps the step before it instead of waiting.
            self.accelerator_config.non_blocking = True
        self.refuse_data_parallel()
        self.resolve_batch_layout()

    def adopt_launcher_precision(self) -> None:
        """--bf16/--fp16 from the precision `accelerate launch` was given (its config's mixed_precision, or
        --mixed_precision), which the Trainer computes in anyway: so that results.json, the card, W&B and the
        checkpoint's options say how the run really trained. A flag given here wins, as it does in the Trainer."""
        if self.fp16 or self.bf16:
            return
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
        self.bf16, self.fp16 = launched == "bf16", launched == "fp16"

    def refuse_data_parallel(self) -> None:
        """One process that sees several GPUs: the Trainer would wrap the model in nn.DataParallel, whose per-GPU
        item counts multiply the step's loss (and its gradients) by the number of GPUs."""
        if self.n_gpu > 1:
            raise UsageError(
                f"this process sees {self.n_gpu} GPUs; train on several with `accelerate launch --config_file "
                "experiments/accelerate/multi_gpu.yaml ...`, or on one with CUDA_VISIBLE_DEVICES=0"
            )

    # ---- Global batch over processes (scale-out) ----
    def resolve_batch_layout(self) -> None:
        """Derive the per-device batch and gradient accumulation from the global batch and the world size.

        global = per-device x accumulation x processes. The per-device batch is the largest that evenly
        divides each process's share without exceeding per_device_train_batch_size, so accumulation is only
        used when the share doesn't fit. Re-running it on its own result changes nothing.
        """
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > self.world_size:
            # torchrun/accelerate started several processes, but each one came up alone (no GPU and no
            # --use_cpu): they would all train the same model and all write output_dir.
            raise UsageError(
                f"launched as {launched} processes, but they did not form one group; on a machine without GPUs "
                "add --use_cpu true to run them on the CPU (gloo backend)"
            )
        if not self.global_train_batch_size:
            return
        processes = self.world_size
        if self.global_train_batch_size % processes:  # its range (>= 0) is checked with every option's
            raise UsageError(
                f"--global_train_batch_size {self.global_train_batch_size} does not split evenly over {processes} "
                f"processes; use a multiple of {processes}, or run on a number of processes that divides it"
            )
        if self.gradient_accumulation_steps != 1 and (
            self.per_device_train_batch_size * self.gradient_accumulation_steps * processes
            != self.global_train_batch_size
        ):
            raise UsageError(
                "--gradient_accumulation_steps is derived from --global_train_batch_size; leave it out, or pass "
                "--global_train_batch_size 0 to set the per-device batch and accumulation yourself"
            )
        share = self.global_train_batch_size // processes
        accumulation = next(
            steps
            for steps in range(1, share + 1)
            if share % steps == 0 and share // steps <= self.per_device_train_batch_size
        )
        self.per_device_train_batch_size, self.gradient_accumulation_steps = share // accumulation, accumulation

    @property
    def global_batch(self) -> int:
        """Sentences per optimizer step over all processes, however they are laid out."""
        return self.world_size * self.per_device_train_batch_size * self.gradient_accumulation_steps

    def batch_layout(self) -> str:
        """One log line: how the global batch is split over processes and accumulation steps."""
        return (
            f"batch: world size {self.world_size} x per-device batch {self.per_device_train_batch_size} x "
            f"gradient accumulation {self.gradient_accumulation_steps} = global batch {self.global_batch}"
        )


@dataclass
class TrackingArguments:
    experiment_name: str | None = field(
        default=None,
        metadata={"help": "W&B group: the runs of one experiment (seeds, a grid) side by side."},
    )
    wandb_project: str | None = field(
        default=None, metadata={"help": "W&B project (default: $WANDB_PROJECT, else 'cola-hf')."}
    )
    log_model: bool = field(default=False, metadata={"help": "Upload the final model to W&B as an artifact."})
    recipe_name: str | None = field(
        default=None,
        metadata={"help": "Recipe name in W&B run names and tags (default: the recipe file's name, else 'cola')."},
    )


@dataclass
class StudyArguments:
    """Many runs of one recipe, each in OUTPUT_DIR/<run name>."""

    seeds: list[int] | None = field(
        default=None,
        metadata={"help": "Run the recipe once per seed (e.g. --seeds 42 43 44) and aggregate the test MCCs."},
    )
    grid: str | None = field(
        default=None,
        metadata={
            "help": "Run every point of a W&B sweep file's grid: the same as --search FILE for a 'method: grid' "
            "file (e.g. experiments/sweeps/bert_paper_grid.yaml)."
        },
    )
    per_run_output_dir: bool = field(
        default=False,
        metadata={"help": "Write into OUTPUT_DIR/<run name>, one folder per run (W&B sweeps use it)."},
    )
    # The search (cola_hf/studies/search/, docs/search.md).
    search: str | None = field(
        default=None,
        metadata={
            "help": "Search a W&B sweep file's space with Optuna (grid/random/bayes); the best trial's model and "
            "test results go to OUTPUT_DIR/best (e.g. experiments/sweeps/wide.yaml)."
        },
    )
    n_trials: int | None = field(
        default=None,
        metadata={"help": "Trials of the search in total, over all its workers (a grid: every point by default)."},
    )
    search_storage: str | None = field(
        default=None,
        metadata={
            "help": "Optuna storage URL that the search's workers share (postgresql://user@host/db, the password "
            "from PGPASSWORD or ~/.pgpass; sqlite:///PATH); default: a journal file in OUTPUT_DIR/search."
        },
    )
    search_heartbeat_interval: int = field(
        default=60,
        metadata={"help": "With --search_storage: seconds between the heartbeats a worker records for its trial."},
    )
    search_grace_period: int = field(
        default=300,
        metadata={
            "help": "With --search_storage: a trial whose worker has recorded no heartbeat for this many seconds "
            "is taken for dead: failed, and run again by another worker."
        },
    )
    search_pruner: str = field(
        default="median",
        metadata={
            "help": "Stop hopeless trials early on their per-epoch validation MCC.",
            "choices": ["none", "median", "hyperband"],
        },
    )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, ColaTrainingArguments, TrackingArguments, StudyArguments)
GROUPS = ("model", "data", "training", "tracking", "study")

# What each option is for, said once; every list the package uses is derived from this table. An option not
# listed has none of these roles: a recipe holds it where it differs from the default, and a search may vary it.
#   card          in the model card's hyperparameter table (in this order)
#   recipe        a recipe spells it out even at its default (best_params.yaml, as experiments/recipes/tutorial.yaml)
#   trajectory    decides what training computes, step by step: a checkpoint continues only under the same values
#                 (the Trainer restores the optimizer and schedule from it, so a changed learning rate would be
#                 recorded but not used). Paths are left out (a cluster may mount the same data elsewhere), and so is
#                 the batch's layout over devices: RunOptions.trajectory adds the global batch instead (every layout
#                 trains the same steps; the layout itself is checked against the checkpoint: training/output_dir.py).
#   tokenization  changes the tokenized files: a search tokenizes once per distinct combination
#   local         where and how this one run is kept or shared, not what it computes: never in a recipe written
#                 for others, never searched (the search sets it for every trial)
#   unsearchable  a search cannot vary it: its trials would not be trials of one recipe
# Every study option (StudyArguments: how many runs, not what one run does) is local as well.
_ROLES = {
    "model_name_or_path": "card recipe tokenization",
    "learning_rate": "card recipe trajectory",
    "optim": "card recipe trajectory",
    "adam_beta1": "card recipe trajectory",
    "adam_beta2": "card recipe trajectory",
    "adam_epsilon": "card recipe trajectory",
    "weight_decay": "card recipe trajectory",
    "lr_scheduler_type": "card recipe trajectory",
    "warmup_steps": "card recipe trajectory",
    "max_grad_norm": "card recipe trajectory",
    "layerwise_lr_decay": "card trajectory",
    "reinit_top_layers": "card trajectory",
    "early_stopping_patience": "card trajectory",
    "per_device_train_batch_size": "card recipe",
    "gradient_accumulation_steps": "card",
    "num_train_epochs": "card recipe trajectory",
    "seed": "card recipe trajectory",
    "max_seq_length": "card recipe trajectory tokenization",
    "pad_to_max_length": "card recipe tokenization",
    "validation_fraction": "card recipe trajectory",
    "train_sampling_strategy": "card recipe trajectory",
    "fp16": "card trajectory",
    "bf16": "card trajectory",
    "cola_source": "recipe tokenization",
    "max_train_samples": "recipe trajectory",
    "max_steps": "trajectory",
    "global_train_batch_size": "recipe",
    "per_device_eval_batch_size": "recipe",
    "eval_strategy": "recipe",
    "save_strategy": "recipe",
    "load_best_model_at_end": "recipe",
    "metric_for_best_model": "recipe",
    "greater_is_better": "recipe",
    "do_train": "unsearchable",
    "explain_pairs": "unsearchable",
    "explain_method": "unsearchable",
    "report_to": "unsearchable",
    "output_dir": "local",
    "overwrite_output_dir": "local",
    "resume": "local",
    "run_name": "local",
    "logging_dir": "local",
    "push_to_hub": "local",
    "hub_model_id": "local",
    "hub_token": "local",
    "save_only_model": "local",
    "save_total_limit": "local",
    "experiment_name": "local",
    "recipe_name": "local",
    **{f.name: "local study" for f in dataclasses.fields(StudyArguments)},
}
OPTION_ROLES: dict[str, frozenset[str]] = {name: frozenset(roles.split()) for name, roles in _ROLES.items()}


def options_with(role: str) -> tuple[str, ...]:
    """The options that have `role`, in the table's order."""
    return tuple(name for name, roles in OPTION_ROLES.items() if role in roles)


TRAJECTORY_OPTIONS = options_with("trajectory")
STUDY_OPTIONS = frozenset(options_with("study"))


@dataclass(frozen=True)
class Range:
    """The values a numeric option accepts: a closed or open interval, and special values outside it."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    also: tuple = ()  # values with a meaning of their own (max_steps -1: train by epochs)

    def __contains__(self, value: float) -> bool:
        if value in self.also:
            return True
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        low = f"{'>' if self.low_open else '>='} {_number(self.low)}" if self.low != -math.inf else ""
        high = f"{'<' if self.high_open else '<='} {_number(self.high)}" if self.high != math.inf else ""
        text = " and ".join(part for part in (low, high) if part)
        return " or ".join([*map(_number, self.also), text])


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


POSITIVE, AT_LEAST_ONE, NOT_NEGATIVE = Range(0, low_open=True), Range(1), Range(0)
# Checked before anything runs, for every value users set (flags, recipes, search spaces): one line naming the
# option, the value and the range, exit 2, instead of a traceback from deep inside torch or datasets.
OPTION_RANGES = {
    "learning_rate": POSITIVE,
    "num_train_epochs": POSITIVE,
    "max_steps": Range(1, also=(-1,)),
    "global_train_batch_size": NOT_NEGATIVE,
    "per_device_train_batch_size": AT_LEAST_ONE,
    "per_device_eval_batch_size": AT_LEAST_ONE,
    "gradient_accumulation_steps": AT_LEAST_ONE,
    "warmup_steps": NOT_NEGATIVE,
    "weight_decay": NOT_NEGATIVE,
    "adam_beta1": Range(0, 1, high_open=True),
    "adam_beta2": Range(0, 1, high_open=True),
    "adam_epsilon": POSITIVE,
    "max_grad_norm": NOT_NEGATIVE,  # 0: no clipping
    "layerwise_lr_decay": Range(0, 1, low_open=True),
    "reinit_top_layers": NOT_NEGATIVE,  # and at most the model's layers, checked once it is loaded
    "early_stopping_patience": AT_LEAST_ONE,
    "max_seq_length": Range(2),  # [CLS] and [SEP]; the model's positions are checked once it is loaded
    "max_train_samples": AT_LEAST_ONE,
    "validation_fraction": Range(0, 1, low_open=True, high_open=True),
    "logging_steps": POSITIVE,
    "eval_steps": POSITIVE,
    "save_steps": POSITIVE,
    "save_total_limit": AT_LEAST_ONE,
    "seed": Range(0, 2**32 - 1),  # numpy's seeds
    "seeds": Range(0, 2**32 - 1),
    "n_trials": AT_LEAST_ONE,
    "dataloader_num_workers": NOT_NEGATIVE,
    "explain_pairs": NOT_NEGATIVE,
}


def check_range(name: str, value: Any, where: str = "") -> None:
    """Raise UsageError (one line: `where`, the option, the value, the range) when `value` is outside `name`'s."""
    allowed = OPTION_RANGES.get(name)
    values = value if isinstance(value, list | tuple) else [value]
    for each in values:
        if allowed is None or each is None or isinstance(each, bool) or not isinstance(each, int | float):
            continue
        if each not in allowed or math.isnan(each):
            shown = _number(each) if math.isfinite(each) else each
            raise UsageError(f"{where}--{name} {shown}: out of range, expected {allowed}")


@dataclass(frozen=True)
class OptionSpec:
    """One flag as argparse reads it: what a recipe value or a searched value goes through."""

    name: str
    convert: Callable[[str], Any]
    choices: tuple | None
    takes_list: bool
    roles: frozenset[str]


def option_specs(parser: HfArgumentParser | None = None) -> dict[str, OptionSpec]:
    """Every option of a run (of `parser`, by default make_parser()'s) by name, in --help's order."""
    return _option_specs() if parser is None else _specs_of(parser)


@functools.cache
def _option_specs() -> dict[str, OptionSpec]:
    return _specs_of(make_parser())


def _specs_of(parser: HfArgumentParser) -> dict[str, OptionSpec]:
    return {
        action.dest: OptionSpec(
            action.dest,
            action.type or str,
            tuple(action.choices) if action.choices is not None else None,
            action.nargs in ("+", "*"),
            OPTION_ROLES.get(action.dest, frozenset()),
        )
        for action in parser._actions
        if action.dest != "help"
    }


@dataclass
class RunOptions:
    """Every option of one run, by group; what the run, studies and the W&B run are built from."""

    model: ModelArguments
    data: DataArguments
    training: ColaTrainingArguments
    tracking: TrackingArguments
    study: StudyArguments
    recipe_file: str | None = None  # the RECIPE.yaml the options came from, if any

    def groups(self) -> tuple[Any, ...]:
        return self.model, self.data, self.training, self.tracking, self.study

    def replace(self, **changes: Any) -> RunOptions:
        """A copy with `changes` applied, each to the group that owns the option (values already converted)."""
        updated = {}
        for name, group in zip(GROUPS, self.groups(), strict=True):
            own = {key: value for key, value in changes.items() if key in _field_names(group)}
            # dataclasses.replace runs __post_init__ again: the batch layout follows a new global batch.
            updated[name] = dataclasses.replace(group, **own) if own else group
        unknown = set(changes) - {key for group in self.groups() for key in _field_names(group)}
        if unknown:
            raise ValueError(f"not options of a run: {', '.join(sorted(unknown))}")
        return RunOptions(**updated, recipe_file=self.recipe_file)

    @property
    def recipe(self) -> str:
        """The recipe's name in run names and W&B tags: --recipe_name, else the recipe file's stem, else 'cola'."""
        return self.tracking.recipe_name or (Path(self.recipe_file).stem if self.recipe_file else "cola")

    def run_name(self) -> str:
        """`tutorial-lr2e-05-bs32-ep4-seed42`: an explicit --run_name, else the recipe plus what studies vary.

        The batch size is the effective one (per device x devices x accumulation), so runs on different
        hardware with the same optimisation get the same name.
        """
        if self.training.run_name:
            return self.training.run_name
        args = self.training
        name = f"{self.recipe}-lr{args.learning_rate:g}-bs{args.global_batch}-ep{args.num_train_epochs:g}"
        name += f"-seed{args.seed}"
        if self.data.max_train_samples is not None:
            name += f"-n{self.data.max_train_samples}"
        return name

    def values(self) -> dict[str, Any]:
        """Every option by name, as results.json, W&B, the card and a recipe record them.

        The one flattening of the options: everything that records a run's options starts from it, so this is
        where passwords and tokens are masked (`--search_storage postgresql://cola:***@db/optuna`, a source URL's
        password, `hub_token`): cola_hf/redaction.py.
        """
        return redact_options(
            {
                **dataclasses.asdict(self.model),
                **dataclasses.asdict(self.data),
                **self.training.to_dict(),
                **dataclasses.asdict(self.tracking),
                **dataclasses.asdict(self.study),
            }
        )

    def config(self) -> dict[str, Any]:
        """The run's options as results.json records them: all but the study's (how many runs, not this one)."""
        return {name: value for name, value in self.values().items() if name not in STUDY_OPTIONS}

    def trajectory(self) -> dict[str, Any]:
        """The options that decide what training computes, step by step (`TRAJECTORY_OPTIONS`), as results.json
        records them, and the global batch however it is laid out over devices."""
        values = self.values()
        return {"global_batch": self.training.global_batch, **{name: values[name] for name in TRAJECTORY_OPTIONS}}

    def tokenization_key(self) -> tuple:
        """What the tokenized files depend on: runs with the same key can share them."""
        values = self.values()
        return tuple(values[name] for name in options_with("tokenization"))

    def recipe_values(self) -> dict[str, Any]:
        """The options a recipe file must hold to run as these do, as YAML scalars in --help's order: the
        options a recipe always spells out, plus every other one that differs from its default, never a local one.
        """
        values, defaults = _as_recipe(self.values()), _as_recipe(parse_args([]).values())
        return {
            name: value
            for name, value in values.items()
            if "local" not in OPTION_ROLES.get(name, ())
            and ("recipe" in OPTION_ROLES.get(name, ()) or value != defaults.get(name))
        }


def _as_recipe(values: dict[str, Any]) -> dict[str, Any]:
    """The values a recipe can hold, in --help's order, as the flags spell them."""
    recipe = {}
    for name, spec in option_specs().items():
        if name not in values or name in recipe:
            continue
        value = values[name]
        if isinstance(value, list) and len(value) <= 1 and not spec.takes_list:
            value = value[0] if value else "none"  # report_to: ['wandb'] is the flag's 'wandb', [] its 'none'
        if value is None or isinstance(value, bool | int | float | str):
            recipe[name] = value
    return recipe


def _field_names(group: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(group)}


def model_short_name(model_name_or_path: str) -> str:
    """'bert-base-uncased', 'prajjwal1/bert-tiny' -> 'bert-tiny', '/models/all-MiniLM-L6-v2' -> its folder."""
    return Path(model_name_or_path.rstrip("/")).name or model_name_or_path


class _OneLineErrorParser(HfArgumentParser):
    """argparse answers a bad flag with its whole usage (100+ lines here) and exits; one line says more."""

    def error(self, message: str):  # noqa: ANN201 (argparse's signature)
        raise UsageError(f"{message} (see --help)")


def make_parser() -> HfArgumentParser:
    return _OneLineErrorParser(ARGUMENT_CLASSES)


def recipe_to_argv(recipe_path: str | Path, parser: HfArgumentParser) -> list[str]:
    """Turn a YAML recipe into command-line tokens, so argparse type-checks it like any flag.

    Recipe values come first in argv, so flags given on the command line override them.
    """
    path = Path(recipe_path)
    recipe = read_yaml(path, "recipe") or {}
    if not isinstance(recipe, dict):
        raise UsageError(f"{path}: a recipe is a mapping of option: value, found {type(recipe).__name__}")
    known = {action.dest for action in parser._actions}
    flags = {option: action for action in parser._actions for option in action.option_strings}
    argv: list[str] = []
    for key, value in recipe.items():
        if key not in known:
            raise UsageError(f"{path}: unknown option '{key}' (see --help for the options)")
        if value is None:
            continue
        action = flags.get(f"--{key}")
        if isinstance(value, list) and action is not None and action.nargs not in ("+", "*"):
            raise UsageError(f"{path}: option '{key}' takes one value, found a list")
        values = value if isinstance(value, list) else [value]
        tokens = [_yaml_scalar_to_token(path, key, v) for v in values]
        for token in tokens:
            _check_recipe_value(path, key, action, token)
        argv += [f"--{key}", *tokens]
    return argv


_EXPECTED = {int: "an integer", float: "a number", string_to_bool: "true or false"}


def _check_recipe_value(path: Path, key: str, action, token: str) -> None:
    """Convert a recipe value as argparse will, so a wrong type names the recipe and the key (argparse can't)."""
    convert = getattr(action, "type", None) or str
    try:
        value = convert(token)
    except (TypeError, ValueError, ArgumentTypeError) as err:
        expected = _EXPECTED.get(convert)
        raise UsageError(
            f"{path}: option '{key}' expects {expected}, found {token!r}"
            if expected
            else f"{path}: option '{key}': {err}"
        ) from err
    if getattr(action, "choices", None) is not None and value not in action.choices:
        raise UsageError(f"{path}: option '{key}' expects one of {list(action.choices)}, found {token!r}")


def _yaml_scalar_to_token(path: Path, key: str, value: object) -> str:
    if isinstance(value, dict | list):
        raise UsageError(f"{path}: option '{key}' takes a single value or a list of values, found a mapping")
    return str(value)


def parse_args(argv: list[str] | None = None) -> RunOptions:
    """Parse `[RECIPE.yaml] [--flags]`; flags override the recipe, the recipe overrides the defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    recipe_file = None
    if argv and argv[0].endswith((".yaml", ".yml")):
        recipe_file = argv[0]
        argv = recipe_to_argv(recipe_file, parser) + argv[1:]
    # Ranges first, on the values as given: before the dataclasses' own checks (TrainingArguments', the batch
    # layout's), so that every value out of range is the same one line naming it and its range.
    given, _ = parser.parse_known_args(argv)
    for name, value in vars(given).items():
        check_range(name, value)
    try:
        *groups, unused = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as err:
        # TrainingArguments checks its values (an unknown --optim, mismatched strategies) with ValueError.
        raise UsageError(" ".join(str(err).split())) from err
    if recipes := [arg for arg in unused if arg.endswith((".yaml", ".yml")) and not arg.startswith("-")]:
        raise UsageError(
            f"{recipes[0]}: a recipe comes first, before the flags: experiments/cola.py RECIPE.yaml --flags"
        )
    if unused:
        raise UsageError(f"unrecognized arguments: {' '.join(unused)} (see --help)")
    return RunOptions(*groups, recipe_file=recipe_file)
