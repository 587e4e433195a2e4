"""The Trainer subclass with the default arguments IS the tutorial's optimisation, step for step."""

import pytest
import torch
from torch.utils.data import DataLoader, SequentialSampler
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainerCallback,
    get_linear_schedule_with_warmup,
)

from cola_hf.config import parse_args
from cola_hf.data.cola import load_cola, tokenize_cola
from cola_hf.training.trainer import TutorialTrainer

EPOCHS = 3


def fresh_model(model_dir):
    # No dropout: both loops then compute the same function of the same weights and batches.
    return AutoModelForSequenceClassification.from_pretrained(
        model_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )


class RecordLearningRate(TrainerCallback):
    def __init__(self):
        self.rates = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.rates.append(optimizer.param_groups[0]["lr"])


# The default (fused: one kernel per step) and the unfused loop both follow the tutorial's unfused optimizer.
@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_trainer_matches_hand_written_tutorial_loop(tmp_path, cola_dir, tiny_model_dir, optim):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    train = tokenize_cola(load_cola(str(cola_dir)), tokenizer)["train"].select(range(96))
    args = parse_args(
        [
            "--output_dir", str(tmp_path), "--num_train_epochs", str(EPOCHS), "--report_to", "none",
            "--train_sampling_strategy", "sequential", "--eval_strategy", "no", "--save_strategy", "no",
            "--learning_rate", "1e-3",  # large enough that every step moves the weights visibly
            "--optim", optim,
        ]
    ).training  # fmt: skip
    collator = DataCollatorWithPadding(tokenizer)
    initial = fresh_model(tiny_model_dir)
    state = {name: tensor.clone() for name, tensor in initial.state_dict().items()}

    recorder = RecordLearningRate()
    trainer = TutorialTrainer(model=initial, args=args, train_dataset=train, data_collator=collator)
    trainer.add_callback(recorder)
    trainer.train()

    # The tutorial's loop, cell for cell (with the same data, in the same order).
    model = fresh_model(tiny_model_dir)
    model.load_state_dict(state)
    columns = [
        name for name in ("input_ids", "attention_mask", "token_type_ids", "label") if name in train.column_names
    ]
    loader = DataLoader(
        train.select_columns(columns), sampler=SequentialSampler(train), batch_size=32, collate_fn=collator
    )
    # The tutorial used transformers.AdamW, whose weight decay defaults to 0 (torch's defaults to 0.01).
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-8, weight_decay=0.0)
    total_steps = len(loader) * EPOCHS
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=total_steps)
    rates = []
    for _ in range(EPOCHS):
        model.train()
        for batch in loader:
            model.zero_grad()
            rates.append(optimizer.param_groups[0]["lr"])
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()

    assert trainer.state.global_step == total_steps == 9
    assert recorder.rates == rates
    assert rates == pytest.approx([1e-3 * (1 - k / total_steps) for k in range(total_steps)], rel=1e-12)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(trainer.model.state_dict()[name], tensor, atol=1e-6, rtol=0, msg=name)
    assert any(not torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())


def test_default_schedule_is_the_tutorials_2e5_linear_decay(tmp_path, cola_dir, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    train = tokenize_cola(load_cola(str(cola_dir)), tokenizer)["train"].select(range(64))
    args = parse_args(
        ["--output_dir", str(tmp_path), "--report_to", "none", "--save_strategy", "no", "--eval_strategy", "no"]
    ).training
    trainer = TutorialTrainer(
        model=fresh_model(tiny_model_dir),
        args=args,
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    recorder = RecordLearningRate()
    trainer.add_callback(recorder)
    trainer.train()
    total = 2 * 4  # 64 sentences in batches of 32, 4 epochs
    assert recorder.rates == pytest.approx([2e-5 * (1 - k / total) for k in range(total)], rel=1e-12)
    optimizer = trainer.optimizer
    assert isinstance(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer, torch.optim.AdamW)
    assert all(group["weight_decay"] == 0.0 and group["eps"] == 1e-8 for group in optimizer.param_groups)
    assert all(group["fused"] for group in optimizer.param_groups)
