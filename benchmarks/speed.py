"""Side by side: the tutorial's hand-written training loop vs this package's training path, on one machine.

(a) ``tutorial``: a faithful copy of the tutorial's code cells; (b) ``package``: ``cola_hf.trainer.build_trainer``,
the run's own Trainer, with the defaults of ``cola_hf.config``. What each column means, the deviations from the
tutorial that a fair measurement needs, and the commands: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# Run from a checkout without installing the package.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

PATHS = ("tutorial", "package")
# (key in the JSON, row label, number format)
COLUMNS = (
    ("tokenization_s", "tokenization time (s)", "{:.2f}"),
    ("tokenization_cached_s", "tokenization, later runs (s)", "{:.2f}"),
    ("train_samples_per_s", "training samples/s", "{:.1f}"),
    ("epoch_time_s", "time per epoch (s)", "{:.1f}"),
    ("peak_memory_mb", "peak memory (MB)", "{:.0f}"),
    ("valid_mcc", "validation MCC", "{:.3f}"),
    # A fixed test set (the same sentences whatever the seed's split): MCCs compare without the split's noise.
    ("glue_dev_mcc", "GLUE dev MCC (1043 fixed)", "{:.3f}"),
    # Not asked for, but robust to other processes on a shared machine: CPU seconds, not wall seconds.
    ("epoch_cpu_s", "CPU time per epoch (s)", "{:.1f}"),
)
LABELS = {key: label for key, label, _fmt in COLUMNS}
MCC_COLUMNS = ("valid_mcc", "glue_dev_mcc")
# Above this share of the CPUs taken by other processes during training, timings are not trustworthy.
CLEAN_SHARE = 0.05
COLA_COLUMNS = ["sentence_source", "label", "label_notes", "sentence"]  # the raw TSVs have no header
BATCH_SIZE = 32  # the tutorial's; the package's default is the same (cola_hf.config)
MAX_LEN = 64


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Unknown flags are passed to the package path (cola_hf.config), e.g. --pad_to_max_length.",
    )
    parser.add_argument("--model_name_or_path", required=True, help="BERT checkpoint directory or Hub id.")
    parser.add_argument(
        "--cola_source",
        default=os.environ.get("COLA_ZIP"),
        help="CoLA zip, URL or directory of raw TSVs (default: $COLA_ZIP).",
    )
    parser.add_argument("--max_steps", type=int, default=None, help="Optimizer steps (default: 1 epoch).")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", default=None, help="Write the table as JSON here.")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS), help="Paths to run.")
    parser.add_argument(
        "--reuse_tutorial",
        default=None,
        help="A previous --output JSON: reuse its tutorial result instead of running the tutorial again.",
    )
    parser.add_argument(
        "--tutorial_tokenizer",
        choices=("BertTokenizer", "BertTokenizerLegacy"),
        default="BertTokenizer",
        help="BertTokenizerLegacy is the pure-Python tokenizer the tutorial used in its day.",
    )
    parser.add_argument(
        "--tutorial_bf16",
        action="store_true",
        help="The tutorial loop's forward passes under bf16 autocast, to set beside the package's --bf16 True "
        "(the tutorial itself has no mixed precision).",
    )
    parser.add_argument(
        "--tutorial_trim_padding",
        action="store_true",
        help="Cut each tutorial batch to its longest sentence: the same math (padding is masked out) for less "
        "compute, to measure the tutorial loop's MCC spread over seeds cheaply. Never for its timings.",
    )
    # Internal: set by the parent for each child process.
    parser.add_argument("--path", choices=(*PATHS, "package_cached"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result_file", default=None, help=argparse.SUPPRESS)
    return parser


# --- measurements shared by both paths ----------------------------------------------------------------------
def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def busy_cpu_seconds() -> float | None:
    """CPU seconds every process on the machine has used since boot (Linux /proc/stat), or None elsewhere."""
    try:
        ticks = [int(tick) for tick in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Stopwatch:
    """Wall and CPU seconds of a block, and the share of the machine's CPUs that other processes took meanwhile.

    On a shared machine that share says whether a timing is clean: above a few percent, others competed for
    the cores (and PyTorch's threads then also spin waiting for each other, so wall and CPU time both swell).
    """

    def __enter__(self) -> Stopwatch:
        self._start = (time.perf_counter(), time.process_time(), busy_cpu_seconds())
        self.start_wall = self._start[0]
        return self

    def __exit__(self, *exc_info: object) -> None:
        wall, cpu, busy = time.perf_counter(), time.process_time(), busy_cpu_seconds()
        self.wall_s, self.cpu_s = wall - self._start[0], cpu - self._start[1]
        self.others_cpu_share = (
            None
            if busy is None or self._start[2] is None
            else max(0.0, (busy - self._start[2] - self.cpu_s) / (self.wall_s * (os.cpu_count() or 1)))
        )


def summarize(
    *,
    tokenization_s: float,
    training: Stopwatch,
    steps: int,
    samples: int,
    tokens: int,
    steps_per_epoch: int,
    valid_mcc: float,
    valid_accuracy: float,
    glue_dev_mcc: float,
    memory_before_train_mb: float,
) -> dict[str, Any]:
    return {
        "tokenization_s": tokenization_s,
        "train_samples_per_s": samples / training.wall_s,
        "epoch_time_s": training.wall_s / steps * steps_per_epoch,
        "peak_memory_mb": peak_memory_mb(),
        "valid_mcc": valid_mcc,
        "glue_dev_mcc": glue_dev_mcc,
        "epoch_cpu_s": training.cpu_s / steps * steps_per_epoch,
        # Context for reading the columns above.
        "valid_accuracy": valid_accuracy,
        "train_time_s": training.wall_s,
        "others_cpu_share_during_training": training.others_cpu_share,
        "steps": steps,
        "steps_per_epoch": steps_per_epoch,
        "train_samples": samples,
        "train_tokens_incl_padding": tokens,
        "memory_before_train_mb": memory_before_train_mb,
    }


# --- (a) the tutorial's loop --------------------------------------------------------------------------------
def run_tutorial(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import pandas as pd
    import torch
    import transformers
    from sklearn.metrics import matthews_corrcoef
    from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, TensorDataset, random_split
    from transformers import BertForSequenceClassification, get_linear_schedule_with_warmup

    from cola_hf.data.cola import find_raw_dir

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    raw_dir = find_raw_dir(args.cola_source)
    df = pd.read_csv(
        raw_dir / "in_domain_train.tsv",
        delimiter="\t",
        header=None,
        names=COLA_COLUMNS,
    )
    sentences = df.sentence.values
    labels = df.label.values
    tokenizer = getattr(transformers, args.tutorial_tokenizer).from_pretrained(
        args.model_name_or_path, do_lower_case=True
    )

    start = time.perf_counter()
    max_len = 0
    for sent in sentences:
        input_ids = tokenizer.encode(sent, add_special_tokens=True)
        max_len = max(max_len, len(input_ids))
    input_ids = []
    attention_masks = []
    for sent in sentences:
        encoded_dict = tokenizer(
            sent,
            add_special_tokens=True,
            max_length=MAX_LEN,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        input_ids.append(encoded_dict["input_ids"])
        attention_masks.append(encoded_dict["attention_mask"])
    input_ids = torch.cat(input_ids, dim=0)
    attention_masks = torch.cat(attention_masks, dim=0)
    labels = torch.tensor(labels)
    tokenization_s = time.perf_counter() - start

    dataset = TensorDataset(input_ids, attention_masks, labels)
    train_size = int(0.9 * len(dataset))
    val_size = len(dataset) - train_size
    train_dataset, val_dataset = random_split(dataset, [train_size, val_size])
    train_dataloader = DataLoader(train_dataset, sampler=RandomSampler(train_dataset), batch_size=BATCH_SIZE)
    validation_dataloader = DataLoader(val_dataset, sampler=SequentialSampler(val_dataset), batch_size=BATCH_SIZE)

    model = BertForSequenceClassification.from_pretrained(
        args.model_name_or_path, num_labels=2, output_attentions=False, output_hidden_states=False
    )
    model.to(device)
    # The tutorial's transformers.AdamW had no weight decay by default; torch's AdamW defaults to 0.01.
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, eps=1e-8, weight_decay=0.0)
    total_steps = args.max_steps or len(train_dataloader)
    epochs = math.ceil(total_steps / len(train_dataloader))
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=total_steps)

    # Not the tutorial's: bf16 autocast around its forward passes (--tutorial_bf16), as the Trainer's --bf16 does.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.tutorial_bf16)
    torch.manual_seed(args.seed)  # where the tutorial seeds: right before its loop
    memory_before_train_mb = peak_memory_mb()
    steps = samples = tokens = 0
    total_train_loss = 0.0
    with Stopwatch() as training:
        for _epoch_i in range(epochs):
            model.train()
            for batch in train_dataloader:
                if steps == total_steps:
                    break
                if steps % 40 == 0 and steps:  # the tutorial's progress line
                    elapsed = time.perf_counter() - training.start_wall
                    print(f"  Batch {steps:>5,}  of  {total_steps:>5,}.    Elapsed: {elapsed:.0f} s.", flush=True)
                b_input_ids = batch[0].to(device)
                b_input_mask = batch[1].to(device)
                b_labels = batch[2].to(device)
                if args.tutorial_trim_padding:
                    b_input_ids, b_input_mask = trim_padding(b_input_ids, b_input_mask)
                model.zero_grad()
                with autocast:
                    output = model(b_input_ids, token_type_ids=None, attention_mask=b_input_mask, labels=b_labels)
                total_train_loss += output.loss.item()
                output.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                steps += 1
                samples += b_input_ids.shape[0]
                tokens += b_input_ids.numel()

    def predict(dataloader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
        model.eval()
        predictions, true_labels = [], []
        for batch in dataloader:
            b_input_ids, b_input_mask, b_labels = (t.to(device) for t in batch)
            if args.tutorial_trim_padding:
                b_input_ids, b_input_mask = trim_padding(b_input_ids, b_input_mask)
            with torch.no_grad(), autocast:
                output = model(b_input_ids, token_type_ids=None, attention_mask=b_input_mask)
            predictions.append(output.logits.detach().float().cpu().numpy())  # float: bf16 has no numpy type
            true_labels.append(b_labels.to("cpu").numpy())
        return np.concatenate(true_labels), np.argmax(np.concatenate(predictions), axis=1)

    flat_true_labels, flat_predictions = predict(validation_dataloader)

    # The tutorial's test step (read with pandas, tokenized sentence by sentence, sequential batches of 32),
    # on GLUE's dev set: its out_of_domain_dev plus in_domain_dev.
    test = pd.concat(
        pd.read_csv(raw_dir / f"{name}.tsv", delimiter="\t", header=None, names=COLA_COLUMNS)
        for name in ("in_domain_dev", "out_of_domain_dev")
    )
    encoded = [
        tokenizer(sent, max_length=MAX_LEN, padding="max_length", truncation=True, return_tensors="pt")
        for sent in test.sentence.values
    ]
    test_data = TensorDataset(
        torch.cat([e["input_ids"] for e in encoded]),
        torch.cat([e["attention_mask"] for e in encoded]),
        torch.tensor(test.label.values),
    )
    test_labels, test_predictions = predict(
        DataLoader(test_data, sampler=SequentialSampler(test_data), batch_size=BATCH_SIZE)
    )

    return summarize(
        tokenization_s=tokenization_s,
        training=training,
        steps=steps,
        samples=samples,
        tokens=tokens,
        steps_per_epoch=len(train_dataloader),
        valid_mcc=float(matthews_corrcoef(flat_true_labels, flat_predictions)),
        valid_accuracy=float((flat_predictions == flat_true_labels).mean()),
        glue_dev_mcc=float(matthews_corrcoef(test_labels, test_predictions)),
        memory_before_train_mb=memory_before_train_mb,
    ) | {
        # The tutorial keeps nothing between runs: every run tokenizes again.
        "tokenization_cached_s": tokenization_s,
        "longest_sentence_tokens": max_len,
        "train_loss": total_train_loss / steps,
    }


def trim_padding(input_ids, attention_mask):
    """Drop the padding columns every row of a right-padded batch has."""
    keep = int(attention_mask.sum(dim=1).max())
    return input_ids[:, :keep], attention_mask[:, :keep]


# --- (b) this package's training path -----------------------------------------------------------------------
def run_package(args: argparse.Namespace, package_flags: list[str]) -> dict[str, Any]:
    from transformers import set_seed

    from cola_hf.config import parse_args
    from cola_hf.data.cola import read_cola
    from cola_hf.run import split_data
    from cola_hf.training.model import load_model_and_tokenizer
    from cola_hf.training.trainer import TutorialTrainer, build_trainer

    with tempfile.TemporaryDirectory(prefix="cola-speed-") as output_dir:
        options = parse_args(
            [
                "--model_name_or_path", args.model_name_or_path,
                "--cola_source", args.cola_source,
                "--seed", str(args.seed),
                *package_flags,
                # Benchmark plumbing, not levers: time training alone, write nothing.
                "--output_dir", output_dir,
                # The same optimizer steps, and so the same schedule, as the tutorial path.
                *(["--max_steps", str(args.max_steps)] if args.max_steps else ["--num_train_epochs", "1"]),
                "--eval_strategy", "no",
                "--save_strategy", "no",
                "--report_to", "none",
                "--disable_tqdm", "True",
            ]
        )  # fmt: skip
        training_args = options.training
        set_seed(training_args.seed)
        files = read_cola(options.data.cola_source)
        model, tokenizer = load_model_and_tokenizer(options.model.model_name_or_path)
        files, tokenization_s = tokenize_files(files, tokenizer, options.data)
        if args.path == "package_cached":
            # A user's second run: the parent points this child at the datasets cache the first one filled.
            return {"tokenization_cached_s": tokenization_s}
        tokenized = split_data(options, files)
        trainer = build_trainer(options, tokenized, model, tokenizer, trainer_class=_counting(TutorialTrainer))
        memory_before_train_mb = peak_memory_mb()
        with Stopwatch() as training:
            trainer.train()
        metrics = trainer.evaluate()
        glue_dev_metrics = trainer.predict(tokenized["glue_dev"]).metrics
        steps = trainer.state.global_step
        steps_per_epoch = math.ceil(len(tokenized["train"]) / training_args.train_batch_size)

    return summarize(
        tokenization_s=tokenization_s,
        training=training,
        steps=steps,
        samples=trainer.samples_seen,
        tokens=trainer.tokens_seen,
        steps_per_epoch=steps_per_epoch,
        valid_mcc=metrics["eval_matthews_correlation"],
        valid_accuracy=metrics["eval_accuracy"],
        glue_dev_mcc=glue_dev_metrics["test_matthews_correlation"],
        memory_before_train_mb=memory_before_train_mb,
    ) | {"package_flags": package_flags}


def tokenize_files(files, tokenizer, data_args) -> tuple[Any, float]:
    """The package's tokenization of CoLA's files, and the time it took on in_domain_train: the tutorial's."""
    import datasets

    from cola_hf.data.cola import tokenize_cola

    def tokenize(names: tuple[str, ...]) -> datasets.DatasetDict:
        chosen = datasets.DatasetDict({name: files[name] for name in names})
        return tokenize_cola(chosen, tokenizer, data_args.max_seq_length, data_args.pad_to_max_length)

    start = time.perf_counter()
    train = tokenize(("in_domain_train",))
    tokenization_s = time.perf_counter() - start
    return datasets.DatasetDict(**train, **tokenize(("in_domain_dev", "out_of_domain_dev"))), tokenization_s


def _counting(trainer_class: type) -> type:
    """`trainer_class` that also counts the samples and tokens (padding included) each training step sees.

    Counted from tensor shapes, so it adds no host sync, and in the training process, so dataloader workers
    do not hide it.
    """

    class CountingTrainer(trainer_class):
        samples_seen = 0
        tokens_seen = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.samples_seen += inputs["input_ids"].shape[0]
            self.tokens_seen += inputs["input_ids"].numel()
            return super().training_step(model, inputs, num_items_in_batch)

    return CountingTrainer


# --- the parent: one child process per path, one table ------------------------------------------------------
def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def run_child(path: str, argv: list[str], datasets_cache: str) -> dict[str, Any]:
    """Run one path in a fresh interpreter (so it has its own peak RSS); return its result and the load."""
    with tempfile.TemporaryDirectory(prefix="cola-speed-") as tmp:
        result_file = Path(tmp) / "result.json"
        load_before = os.getloadavg()
        script = str(Path(__file__).resolve())
        command = [sys.executable, script, *argv, "--path", path, "--result_file", str(result_file)]
        print(f"[speed] running the {path} path ...", file=sys.stderr, flush=True)
        subprocess.run(command, check=True, env={**os.environ, "HF_DATASETS_CACHE": datasets_cache})
        result = json.loads(result_file.read_text())
    # The 1-minute load average before and after: another busy process on the machine shows up here.
    result["load_average_1min_before_after"] = [load_before[0], os.getloadavg()[0]]
    return result


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    if not all(path in results for path in PATHS):
        return {}
    tutorial, package = results["tutorial"], results["package"]
    # A ratio of two correlations means little: MCCs are compared by their difference (see main).
    return {
        key: package[key] / tutorial[key] if tutorial[key] and key not in MCC_COLUMNS else None
        for key, _label, _fmt in COLUMNS
    }


def format_table(results: dict[str, dict[str, Any]], ratio: dict[str, float | None]) -> str:
    header = f"| {'':<30} | {'(a) tutorial loop':>17} | {'(b) cola_hf':>12} | {'(b)/(a)':>8} |"
    lines = [header, "|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|"]
    for key, label, fmt in COLUMNS:
        cells = [fmt.format(results[path][key]) if path in results else "-" for path in PATHS]
        ratio_cell = f"{ratio[key]:.2f}" if ratio.get(key) is not None else "-"
        lines.append(f"| {label:<30} | {cells[0]:>17} | {cells[1]:>12} | {ratio_cell:>8} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, package_flags = build_parser().parse_known_args(argv)
    if not args.cola_source:
        build_parser().error("--cola_source is required (or set COLA_ZIP)")

    if args.path is not None:  # a child: run one path, write its result
        result = run_tutorial(args) if args.path == "tutorial" else run_package(args, package_flags)
        Path(args.result_file).write_text(json.dumps(result, indent=2))
        return 0
    if package_flags and args.paths == ["tutorial"]:
        build_parser().error(f"unrecognized arguments: {' '.join(package_flags)}")

    results: dict[str, dict[str, Any]] = {}
    if args.reuse_tutorial:
        results["tutorial"] = json.loads(Path(args.reuse_tutorial).read_text())["results"]["tutorial"]
    # A fresh datasets cache: the package path's first tokenization is cold, as on a user's first run, and a
    # second child then times what every later run pays (the cache hit).
    with tempfile.TemporaryDirectory(prefix="cola-speed-datasets-") as datasets_cache:
        for path in args.paths:
            if path == "tutorial" and args.reuse_tutorial:
                continue
            results[path] = run_child(path, argv, datasets_cache)
            if path == "package":
                results[path] |= run_child("package_cached", argv, datasets_cache)
    ratio = ratios(results)
    table = format_table(results, ratio)
    print(table)
    if ratio:
        for key in MCC_COLUMNS:
            difference = results["package"][key] - results["tutorial"][key]
            print(f"{LABELS[key]} difference (b)-(a): {difference:+.3f}")
    shares = {path: result.get("others_cpu_share_during_training") for path, result in results.items()}
    if all(share is not None for share in shares.values()):
        verdict = "clean" if max(shares.values()) <= CLEAN_SHARE else "CONTAMINATED: re-run on a quieter machine"
        listed = ", ".join(f"{path} {share:.0%}" for path, share in shares.items())
        print(f"other processes' share of the CPUs during training: {listed} ({verdict})")
    if args.output:
        report = {
            "columns": {key: label for key, label, _fmt in COLUMNS},
            "results": results,
            "ratio_package_over_tutorial": ratio,
            "machine": machine_info(),
            "command": [Path(sys.argv[0]).name, *argv],
            "table_markdown": table,
        }
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
