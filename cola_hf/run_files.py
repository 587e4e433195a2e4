"""Every file a run writes into its output directory, said once: its name, the module that owns its format, and
what becomes of it: published by the Hub push or not, cleared by --overwrite_output_dir or not, shown or linked
by the model card under which title.

Each `run_file(...)` call below is one row and returns the file's name, which its owner writes to; everything
else derives from the rows: the Hub's allow-list (`published`), what --overwrite_output_dir removes (`cleared`),
what marks a run's outcome, the card's charts and links (`card_entries`) and the table in docs/outputs.md
(`markdown`, checked by tests/test_run_files.py, which also fails when a real run writes a file no row names).
A name may hold one `{}`: the part that varies (a split, a step), matched by `*`.

Imports nothing of the package: every layer may read it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunFile:
    name: str  # relative to the output directory; "{}" marks the part that varies, a trailing "/" a directory
    owner: str  # the module that writes it (and reads it back), or the library that does
    what: str  # one line for docs/outputs.md
    published: bool  # uploaded by the Hub push
    cleared: bool  # removed by --overwrite_output_dir before the new run writes anything
    outcome: bool  # says the run finished or failed: removed whenever a run starts in the directory
    card: str | None  # the model card's title for it: a chart is shown, any other file linked
    model: bool  # part of the saved model: what loads it back (the W&B model artifact uploads these)

    @property
    def pattern(self) -> str:
        return self.name.rstrip("/").replace("{}", "*")

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)

    def part(self, name: str) -> str:
        """What `{}` stands for in `name` (the whole name for a name without one)."""
        prefix, _, suffix = self.name.partition("{}")
        return name[len(prefix) : len(name) - len(suffix)] if "{}" in self.name else name


RUN_FILES: list[RunFile] = []


def run_file(
    name: str,
    owner: str,
    what: str,
    *,
    published: bool,
    cleared: bool = True,
    outcome: bool = False,
    card: str | None = None,
    model: bool = False,
) -> str:
    RUN_FILES.append(RunFile(name, owner, what, published, cleared, outcome, card, model))
    return name


# --- the run's outcome ----------------------------------------------------------------------------------------
RESULTS_FILE = run_file(
    "results.json",
    "cola_hf/results.py",
    "per epoch: training loss, validation loss, accuracy, MCC, times; per test set: MCC, accuracy, positive "
    "ratio, n, MCC per batch of 32; every option; the epoch kept, with --load_best_model_at_end (written last: "
    "it marks the run finished)",
    published=True,
    outcome=True,
    card="Every figure of this card, and the options of the run",
)
MODEL_CARD = run_file(
    "README.md",
    "cola_hf/integrations/hub.py",
    "the model card: a model-index, results, per-phenomenon tables of CoLA and BLiMP, hyperparameters, epochs, charts",
    published=True,
    outcome=True,
)
FAILED_MARKER = run_file(
    "RUN_FAILED",
    "cola_hf/training/output_dir.py",
    "only after a failure or a stop: the one line that said why (a failed directory never passes for a finished one)",
    published=False,
    outcome=True,
)
ERROR_LOG = run_file(
    "error.log",
    "cola_hf/cli/train.py",
    "only after an error nobody foresaw: its traceback (the console gets one line)",
    published=False,
    outcome=True,
)

# --- the tutorial's reports -----------------------------------------------------------------------------------
TRAINING_STATS = run_file(
    "training_stats.csv",
    "cola_hf/analysis/tutorial_report.py",
    "the tutorial's per-epoch table",
    published=True,
    card="The tutorial's per-epoch table",
)
LEARNING_CURVE = run_file(
    "learning_curve.png",
    "cola_hf/analysis/tutorial_report.py",
    "the tutorial's training-vs-validation loss plot",
    published=True,
    card="Learning curve: training and validation loss per epoch",
)
MCC_PER_BATCH = run_file(
    "mcc_per_batch_{}.png",
    "cola_hf/analysis/tutorial_report.py",
    "the tutorial's bar chart of MCC per batch of 32, per test set",
    published=True,
    card="MCC per batch of 32: {}",
)

# --- predictions and what the model gets wrong ----------------------------------------------------------------
BLIMP_PREDICTIONS = run_file(
    "predictions_blimp.tsv",
    "cola_hf/analysis/blimp_report.py",
    "P(acceptable) of both sentences of each BLiMP pair: `UID, pairID, linguistics_term, prob_good, prob_bad`",
    published=False,
)
PREDICTIONS = run_file(
    "predictions_{}.tsv",
    "cola_hf/predictions_tsv.py",
    "per sentence of each test set and of the validation split: `sentence_source, label, sentence, prediction, "
    "prob_acceptable` (CoLA's own sentences: never published)",
    published=False,
)
ANALYSIS_JSON = run_file(
    "analysis.json",
    "cola_hf/analysis/run_analysis.py",
    "per grammatical phenomenon (glue_dev), per source, confusion matrices, calibration (ECE), the "
    "validation-chosen threshold, typed ([analysis.md](analysis.md))",
    published=True,
)
ANALYSIS_MARKDOWN = run_file(
    "analysis.md",
    "cola_hf/analysis/run_analysis.py",
    "the same, to read",
    published=True,
    card="What the model gets wrong: phenomena, sources, calibration, the decision threshold",
)
PHENOMENA_CHART = run_file(
    "phenomena.png",
    "cola_hf/analysis/run_analysis.py",
    "MCC per grammatical phenomenon",
    published=True,
    card="MCC per grammatical phenomenon (glue_dev, 95% intervals)",
)
RELIABILITY_CHART = run_file(
    "reliability.png",
    "cola_hf/analysis/run_analysis.py",
    "calibration: the reliability diagram",
    published=True,
    card="Calibration: reliability diagram",
)
CONFUSION_CHART = run_file(
    "confusion_matrix.png",
    "cola_hf/analysis/run_analysis.py",
    "the confusion matrices (shown in analysis.md)",
    published=True,
)
THRESHOLD_CHART = run_file(
    "threshold.png",
    "cola_hf/analysis/run_analysis.py",
    "MCC against the decision threshold (shown in analysis.md)",
    published=True,
)
BLIMP_JSON = run_file(
    "blimp.json",
    "cola_hf/analysis/blimp_report.py",
    "BLiMP's pair accuracy per phenomenon and paradigm, sentence-level MCC, typed "
    "([analysis.md](analysis.md#blimp-67000-minimal-pairs)); absent with `--blimp_source none` or offline",
    published=True,
)
BLIMP_MARKDOWN = run_file(
    "blimp.md",
    "cola_hf/analysis/blimp_report.py",
    "the same beside GPT-2, an LSTM, a 5-gram model and humans, to read",
    published=True,
    card="BLiMP: every phenomenon and paradigm, beside the published language models and humans",
)
BLIMP_CHART = run_file(
    "blimp.png",
    "cola_hf/analysis/blimp_report.py",
    "BLiMP's pair accuracy per phenomenon, beside GPT-2 and humans",
    published=True,
    card="BLiMP: pair accuracy per phenomenon beside GPT-2, an LSTM, a 5-gram model and humans",
)
EXPLANATIONS_JSON = run_file(
    "explanations.json",
    "cola_hf/analysis/explanations.py",
    "per-word attributions of the test sets' most confidently wrong sentences and of sampled BLiMP pairs, and "
    "the hit rate of the blamed word on the pairs' differing words, typed "
    "([analysis.md](analysis.md#why-did-the-model-say-so)); absent with `--explain_pairs 0`",
    published=True,
)
EXPLANATIONS_HTML = run_file(
    "explanations.html",
    "cola_hf/analysis/explanations.py",
    "the same as one self-contained page: each word shaded by how it moved the judgment, BLiMP's differing "
    "words marked",
    published=True,
    card="Why did the model say so? Word-level explanations, checked against BLiMP's minimal pairs",
)

# --- the model, as save_pretrained writes it -------------------------------------------------------------------
_SAVED_MODEL = "transformers (save_pretrained)"
for _name, _what in (
    ("config.json", "the fine-tuned model's configuration"),
    ("generation_config.json", "written by some model families"),
    ("{}.safetensors", "the fine-tuned model's weights"),
    ("{}.safetensors.index.json", "the index of weights saved in shards"),
    ("tokenizer{}", "the tokenizer"),
    ("special_tokens_map.json", "the tokenizer's special tokens (older tokenizers)"),
    ("vocab.{}", "the tokenizer's vocabulary (slow tokenizers)"),
    ("merges.txt", "the tokenizer's merges (BPE tokenizers)"),
    ("added_tokens.json", "the tokenizer's added tokens (older tokenizers)"),
):
    run_file(_name, _SAVED_MODEL, _what, published=True, model=True)

# --- the Trainer's and the run's bookkeeping -------------------------------------------------------------------
TRAINER_STATE = run_file(
    "trainer_state.json",
    "transformers (Trainer.save_state)",
    "the Trainer's own state and log history",
    published=False,
)
run_file("training_args.bin", "transformers (Trainer)", "the TrainingArguments, pickled", published=False)
CHECKPOINT = run_file(
    "checkpoint-{}/",
    "transformers (Trainer)",
    "the last epoch's checkpoint: the same command continues an unfinished run from it",
    published=False,
)
RUN_OPTIONS_FILE = run_file(
    ".cola.run_options.json",
    "cola_hf/training/output_dir.py",
    "the options a checkpoint may be continued under",
    published=False,
)
LOCK_FILE = run_file(
    ".cola.lock",
    "cola_hf/training/output_dir.py",
    "one run at a time per directory (kept: held while the directory is cleared)",
    published=False,
    cleared=False,
)
HOLDER_FILE = run_file(
    ".cola.lock.holder", "cola_hf/training/output_dir.py", "who holds the lock", published=False, cleared=False
)
SHARED_DIR_TOKEN = run_file(
    ".cola.shared_dir_token",
    "cola_hf/training/output_dir.py",
    "a token the main process writes as a run of several processes starts, which every process must read back "
    "(the directory is the same on every node)",
    published=False,
    cleared=False,
)
WANDB_RUN_ID = run_file(
    ".wandb_run_id",
    "cola_hf/integrations/tracking.py",
    "the W&B run a resumed run continues (kept: a new run in the directory continues it too)",
    published=False,
    cleared=False,
)
run_file(
    "wandb/",
    "wandb",
    "W&B's own directory, unless WANDB_DIR says elsewhere (kept)",
    published=False,
    cleared=False,
)


# --- what derives from the rows --------------------------------------------------------------------------------
def patterns(rows: Iterable[RunFile]) -> tuple[str, ...]:
    return tuple(row.pattern for row in rows)


PUBLISHED_FILES = patterns(row for row in RUN_FILES if row.published)
PREVIOUS_RUN_FILES = patterns(row for row in RUN_FILES if row.cleared)
RUN_OUTCOME_FILES = patterns(row for row in RUN_FILES if row.outcome)
MODEL_FILES = patterns(row for row in RUN_FILES if row.model)


def row_of(name: str) -> RunFile | None:
    """The row naming `name` (a file or directory at the top of an output directory), or None."""
    return next((row for row in RUN_FILES if row.matches(name)), None)


def card_entries(
    output_dir: str | Path, parts: Sequence[str] = (), coming: Sequence[str] = ()
) -> list[tuple[str, str]]:
    """(title, file) of every file the card shows or links that `output_dir` holds, or will once the card is
    written (`coming`: results.json), in the table's order; a name with `{}` is taken in the order of `parts` (the
    test sets), then any other match by name."""
    output_dir = Path(output_dir)
    present = {path.name for path in output_dir.iterdir()} | set(coming) if output_dir.is_dir() else set(coming)
    entries = []
    for row in RUN_FILES:
        if row.card is None:
            continue
        found = sorted(name for name in present if row_of(name) is row)
        found.sort(key=lambda name: (parts.index(row.part(name)) if row.part(name) in parts else len(parts), name))
        entries += [(row.card.format(row.part(name)), name) for name in found]
    return entries


def markdown() -> str:
    """The table of docs/outputs.md."""
    lines = ["| file | written by | what | on the Hub | cleared by `--overwrite_output_dir` |", "|---|---|---|---|---|"]
    for row in RUN_FILES:
        name = row.name.replace("{}", "*")
        lines.append(
            f"| `{name}` | {row.owner} | {row.what} | {'yes' if row.published else 'no'} | "
            f"{'yes' if row.cleared else 'no'} |"
        )
    return "\n".join(lines) + "\n"
