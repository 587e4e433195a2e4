"""The Trainer subclass IS the tutorial's optimisation, step for step, whatever the layout of the batch.

At each point the same sentences, in the same order, go through TutorialTrainer and through the tutorial's own
loop (one forward of the whole batch of 32, its mean loss, backward, clip, AdamW, linear schedule), and every
parameter must agree to 1e-6 after three epochs:
- 96 sentences, 32 x 1, with the fused (default) and the unfused AdamW;
- 110 sentences: each epoch ends with a batch of 14;
- 110 sentences as 8 x 4 accumulation steps, the last step 7 + 7 (each sentence must weigh 1/14, not 1/16 or 1/28);
- the same with `--max_grad_norm 0.01`, where clipping engages at every step;
- 32 x 1 with dropout on: both loops draw the same masks from the same seeded random state;
- 2 gloo processes x 16, the last step 7 on each (dropout off: each process draws its own masks).
And 2 processes with dropout on train, step by step, the very sentences 1 process trains.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from launching import REPO, offline_env
from torch.utils.data import DataLoader, SequentialSampler
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainerCallback,
    get_linear_schedule_with_warmup,
)

from cola_hf.config import parse_args
from cola_hf.data.cola import read_cola, split_cola, tokenize_cola
from cola_hf.training.trainer import TutorialTrainer

EPOCHS = 3
LEARNING_RATE = 1e-3  # large enough that every step moves the weights visibly


def fresh_model(model_dir, dropout: bool = False):
    # Without dropout both loops compute the same function of the same weights and batches.
    off = {} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    return AutoModelForSequenceClassification.from_pretrained(model_dir, **off)


def training_set(model_dir, cola_dir, sentences: int):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenize_cola(split_cola(read_cola(str(cola_dir))), tokenizer)["train"].select(range(sentences)), tokenizer


class RecordingTrainer(TutorialTrainer):
    """Records the learning rate of each step and the sentences (token ids) of every micro-batch it trains."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rates: list[float] = []
        self.trained: list[tuple[int, list[list[int]]]] = []  # (optimizer step, its sentences on this process)
        self.add_callback(_RecordLearningRate(self.rates))

    def training_step(self, model, inputs, num_items_in_batch=None):
        rows = [
            ids[mask.bool()].tolist()
            for ids, mask, label in zip(inputs["input_ids"], inputs["attention_mask"], inputs["labels"], strict=True)
            if label != -100  # a placeholder of zero weight, on a process with no sentence in a short last step
        ]
        self.trained.append((self.state.global_step + 1, rows))
        return super().training_step(model, inputs, num_items_in_batch)


class _RecordLearningRate(TrainerCallback):
    def __init__(self, rates: list[float]) -> None:
        self.rates = rates

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.rates.append(optimizer.param_groups[0]["lr"])


def train(model_dir, cola_dir, output_dir, sentences: int, *flags: str, dropout: bool = False) -> RecordingTrainer:
    """TutorialTrainer on the first `sentences` training sentences, in their order unless flags say otherwise."""
    dataset, tokenizer = training_set(model_dir, cola_dir, sentences)
    args = parse_args(
        [
            "--output_dir", str(output_dir), "--num_train_epochs", str(EPOCHS), "--report_to", "none",
            "--train_sampling_strategy", "sequential", "--eval_strategy", "no", "--save_strategy", "no",
            "--learning_rate", str(LEARNING_RATE), "--disable_tqdm", "true", *flags,
        ]
    ).training  # fmt: skip
    trainer = RecordingTrainer(
        model=fresh_model(model_dir, dropout),
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer.train()
    return trainer


def tutorial_loop(model_dir, cola_dir, sentences: int, max_grad_norm: float = 1.0, dropout: bool = False):
    """The tutorial's loop, cell for cell, on the same sentences in the same order; its weights, learning rates and
    gradient norms before clipping."""
    dataset, tokenizer = training_set(model_dir, cola_dir, sentences)
    columns = [
        name for name in ("input_ids", "attention_mask", "token_type_ids", "label") if name in dataset.column_names
    ]
    loader = DataLoader(
        dataset.select_columns(columns),
        sampler=SequentialSampler(dataset),
        batch_size=32,
        collate_fn=DataCollatorWithPadding(tokenizer),
    )
    model = fresh_model(model_dir, dropout)
    # The tutorial used transformers.AdamW, whose weight decay defaults to 0 (torch's defaults to 0.01).
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, eps=1e-8, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=len(loader) * EPOCHS)
    torch.manual_seed(42)  # where the Trainer seeds (its __init__): the dropout masks follow from here
    rates, norms = [], []
    for _ in range(EPOCHS):
        model.train()
        for batch in loader:
            model.zero_grad()
            rates.append(optimizer.param_groups[0]["lr"])
            model(**batch).loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)))
            optimizer.step()
            scheduler.step()
    return model.state_dict(), rates, norms


def assert_same_weights(got: dict, expected: dict, initial_dir) -> None:
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-6, rtol=0, msg=name)
    initial = fresh_model(initial_dir).state_dict()
    assert any(not torch.equal(initial[name], tensor) for name, tensor in expected.items())  # training moved them


POINTS = {
    "96-32x1-fused": (96, [], {}),
    "96-32x1-unfused": (96, ["--optim", "adamw_torch"], {}),
    "110-short-last-batch": (110, [], {}),
    "110-8x4": (110, ["--per_device_train_batch_size", "8"], {}),
    # Short last steps split unevenly over micro-batches: 15 as 8 + 7, and 14 as 4 + 4 + 3 + 3.
    "111-8x4-uneven-last-step": (111, ["--per_device_train_batch_size", "8"], {}),
    "110-4x8-uneven-last-step": (110, ["--per_device_train_batch_size", "4"], {}),
    "110-8x4-clipping": (
        110,
        ["--per_device_train_batch_size", "8", "--max_grad_norm", "0.01"],
        {"max_grad_norm": 0.01},
    ),
    "110-dropout": (110, [], {"dropout": True}),
}


@pytest.mark.lowest
@pytest.mark.parametrize(("sentences", "flags", "loop"), POINTS.values(), ids=POINTS.keys())
def test_trainer_matches_hand_written_tutorial_loop(tmp_path, cola_dir, tiny_model_dir, sentences, flags, loop):
    trainer = train(tiny_model_dir, cola_dir, tmp_path, sentences, *flags, dropout=loop.get("dropout", False))
    weights, rates, norms = tutorial_loop(tiny_model_dir, cola_dir, sentences, **loop)

    steps = -(-sentences // 32) * EPOCHS
    assert trainer.state.global_step == len(rates) == steps
    assert trainer.rates == rates
    assert rates == pytest.approx([LEARNING_RATE * (1 - k / steps) for k in range(steps)], rel=1e-12)
    if "max_grad_norm" in loop:
        assert min(norms) > loop["max_grad_norm"]  # clipping engaged at every step
    assert_same_weights(trainer.model.state_dict(), weights, tiny_model_dir)


# Run under torch.distributed.run: the point "2 gloo processes x 16", and, with dropout on, each process's record
# of what it trained.
TWO_PROCESSES = """
import json, os, sys, torch
sys.path.insert(0, sys.argv[1])
from test_exactness import train

model_dir, cola_dir, out = sys.argv[2:5]
exact = train(model_dir, cola_dir, out + "/exact", 110, "--use_cpu", "true")
dropout = train(model_dir, cola_dir, out + "/dropout", 110, "--use_cpu", "true", "--train_sampling_strategy",
                "group_by_length", dropout=True)
rank = exact.args.process_index
if rank == 0:
    torch.save(exact.model.state_dict(), out + "/weights.pt")
with open(f"{out}/trained-{rank}.json", "w") as handle:
    json.dump({"exact": exact.trained, "dropout": dropout.trained}, handle)
torch.distributed.barrier()  # no process tears its connections down while another still uses them
torch.distributed.destroy_process_group()  # as cola_hf.cli.train.main does: see close_process_group there
# The trainer above still holds gloo's work objects, which abort the interpreter's finalization now and then
# (SIGABRT; pytorch/pytorch#179291): everything is written, so end without it.
sys.stdout.flush(), sys.stderr.flush()
os._exit(0)
"""


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, cola_dir, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("two-processes")
    (out / "run.py").write_text(TWO_PROCESSES, encoding="utf-8")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*launcher, str(out / "run.py"), str(Path(__file__).parent), str(tiny_model_dir), str(cola_dir), str(out)]
    env = offline_env()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def steps_trained(*records: list) -> dict[int, Counter]:
    """The sentences of each optimizer step over every process (as multisets: a training set may repeat one)."""
    steps: dict[int, Counter] = {}
    for record in records:
        for step, rows in record:
            steps.setdefault(step, Counter()).update(tuple(row) for row in rows)
    return steps


def test_two_processes_by_sixteen_match_the_tutorial_loop(two_processes, cola_dir, tiny_model_dir):
    weights, _, _ = tutorial_loop(tiny_model_dir, cola_dir, 110)
    assert_same_weights(torch.load(two_processes / "weights.pt"), weights, tiny_model_dir)
    records = [json.loads((two_processes / f"trained-{rank}.json").read_text())["exact"] for rank in (0, 1)]
    assert [len(rows) for _, rows in records[0]][-1] == 7  # the last step of 14: 7 on each process


def test_two_processes_with_dropout_train_each_step_on_the_sentences_one_process_does(
    two_processes, tmp_path, cola_dir, tiny_model_dir
):
    one = train(tiny_model_dir, cola_dir, tmp_path, 110, "--train_sampling_strategy", "group_by_length", dropout=True)
    records = [json.loads((two_processes / f"trained-{rank}.json").read_text())["dropout"] for rank in (0, 1)]
    two = steps_trained(*records)
    assert len(two) == EPOCHS * 4
    assert two == steps_trained(one.trained)
    # Epoch by epoch, every sentence once (the same epochs 1 process trains, not one of them three times).
    for epoch in range(EPOCHS):
        sentences = sum((two[step] for step in range(epoch * 4 + 1, epoch * 4 + 5)), Counter())
        assert sum(sentences.values()) == 110


@pytest.mark.lowest
def test_default_schedule_is_the_tutorials_2e5_linear_decay(tmp_path, cola_dir, tiny_model_dir):
    dataset, tokenizer = training_set(tiny_model_dir, cola_dir, 64)
    args = parse_args(
        ["--output_dir", str(tmp_path), "--report_to", "none", "--save_strategy", "no", "--eval_strategy", "no"]
    ).training
    trainer = RecordingTrainer(
        model=fresh_model(tiny_model_dir),
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer.train()
    total = 2 * 4  # 64 sentences in batches of 32, 4 epochs
    assert trainer.rates == pytest.approx([2e-5 * (1 - k / total) for k in range(total)], rel=1e-12)
    optimizer = trainer.optimizer
    assert isinstance(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer, torch.optim.AdamW)
    assert all(group["weight_decay"] == 0.0 and group["eps"] == 1e-8 for group in optimizer.param_groups)
    assert all(group["fused"] for group in optimizer.param_groups)


# Run under torch.distributed.run with 4 processes: 99 sentences leave each epoch a last step of 3, fewer sentences
# than processes (as 15 do on the 16 processes of the multi-node config); then 7 validation sentences are scored,
# with and without --dataloader_drop_last.
FOUR_PROCESSES = """
import json, os, sys, torch
sys.path.insert(0, sys.argv[1])
from test_exactness import train, training_set

model_dir, cola_dir, out = sys.argv[2:5]
trainer = train(model_dir, cola_dir, out + "/run", 99, "--use_cpu", "true")
rank = trainer.args.process_index
if rank == 0:
    torch.save(trainer.model.state_dict(), out + "/weights.pt")
sentences = training_set(model_dir, cola_dir, 7)[0]
scored = {}
for drop_last in (False, True):
    trainer.args.dataloader_drop_last = drop_last
    scored[str(drop_last)] = trainer.predict(sentences).predictions.tolist()
with open(f"{out}/record-{rank}.json", "w") as handle:
    json.dump({"trained": trainer.trained, "scored": scored}, handle)
torch.distributed.barrier()  # no process tears its connections down while another still uses them
torch.distributed.destroy_process_group()  # as cola_hf.cli.train.main does: see close_process_group there
# The trainer above still holds gloo's work objects, which abort the interpreter's finalization now and then
# (SIGABRT; pytorch/pytorch#179291): everything is written, so end without it.
sys.stdout.flush(), sys.stderr.flush()
os._exit(0)
"""


def test_a_last_step_smaller_than_the_processes_trains_and_scores_every_sentence_once(
    tmp_path, cola_dir, tiny_model_dir
):
    (tmp_path / "run.py").write_text(FOUR_PROCESSES, encoding="utf-8")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]
    command = [*launcher, str(tmp_path / "run.py"), str(Path(__file__).parent), str(tiny_model_dir), str(cola_dir)]
    result = subprocess.run(
        [*command, str(tmp_path)], capture_output=True, text=True, env=offline_env(), cwd=REPO, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads((tmp_path / f"record-{rank}.json").read_text()) for rank in range(4)]

    weights, _, _ = tutorial_loop(tiny_model_dir, cola_dir, 99)
    assert_same_weights(torch.load(tmp_path / "weights.pt"), weights, tiny_model_dir)
    # Every process took part in every step (the one without a sentence ran a placeholder of weight zero) ...
    assert all([step for step, _ in record["trained"]] == list(range(1, EPOCHS * 4 + 1)) for record in records)
    # ... and the sentences trained are the training set, each once per epoch.
    dataset, _ = training_set(tiny_model_dir, cola_dir, 99)
    every_sentence = Counter(tuple(ids) for ids in dataset["input_ids"])
    steps = steps_trained(*(record["trained"] for record in records))
    for epoch in range(EPOCHS):
        assert sum((steps[step] for step in range(epoch * 4 + 1, epoch * 4 + 5)), Counter()) == every_sentence
    assert sum(steps[4].values()) == 3  # the last step: 3 sentences on 4 processes

    one = train(tiny_model_dir, cola_dir, tmp_path / "one", 99)
    expected = one.predict(training_set(tiny_model_dir, cola_dir, 7)[0]).predictions
    for drop_last in ("False", "True"):
        scored = np.asarray(records[0]["scored"][drop_last])
        np.testing.assert_allclose(scored, expected, atol=1e-5, rtol=0)  # all 7, in order, like 1 process
