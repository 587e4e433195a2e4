"""The cost of the preemption agreement (StopOnSignal.agreed) beside one optimizer step, on gloo CPU processes.

At every optimizer step and every test batch, each process of a multi-process run all-reduces one number (did
any process receive SIGTERM?) and waits for the result on the host. This measures that call as the run makes it
(accelerate's reduce of a one-element tensor, then `.item()`), and one DDP training step of a real checkpoint at
the tutorial's batch (32 sentences over the processes, CoLA-like lengths), in the same processes:

    torchrun --standalone --nproc_per_node 2 benchmarks/preemption_agreement.py --model_name_or_path MODEL

Prints, on the main process, the milliseconds of each and the agreement's share of a step.
"""

from __future__ import annotations

import argparse
import time

import torch
from accelerate import Accelerator
from transformers import AutoModelForSequenceClassification


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--agreements", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=12, help="tokens per sentence (CoLA's mean is about 11)")
    options = parser.parse_args()

    accelerator = Accelerator(cpu=True)
    flag = torch.zeros(1, device=accelerator.device)
    for _ in range(50):  # warm-up: connections, allocator
        accelerator.reduce(flag, reduction="sum").item()
    started = time.perf_counter()
    for _ in range(options.agreements):
        accelerator.reduce(flag, reduction="sum").item()
    agreement_ms = (time.perf_counter() - started) / options.agreements * 1000

    model = AutoModelForSequenceClassification.from_pretrained(options.model_name_or_path, num_labels=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    per_process = 32 // accelerator.num_processes
    generator = torch.Generator().manual_seed(accelerator.process_index)
    input_ids = torch.randint(1000, 2000, (per_process, options.tokens), generator=generator)
    labels = torch.randint(0, 2, (per_process,), generator=generator)

    def step() -> None:
        loss = model(input_ids=input_ids, labels=labels).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(3):
        step()
    started = time.perf_counter()
    for _ in range(options.steps):
        step()
    step_ms = (time.perf_counter() - started) / options.steps * 1000
    if accelerator.is_main_process:
        print(
            f"{accelerator.num_processes} gloo processes, {torch.get_num_threads()} thread(s) each: agreement "
            f"{agreement_ms:.3f} ms, training step {step_ms:.1f} ms ({per_process} sentences x {options.tokens} "
            f"tokens per process); the agreement is {agreement_ms / step_ms:.2%} of a step"
        )


if __name__ == "__main__":
    main()
