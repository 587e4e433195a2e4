"""The checkpoint to fine-tune (or evaluate): its fast tokenizer and a 2-label classifier with CoLA's labels.

Bad input (a missing directory, one without config.json, a Hub id that cannot be had offline, a weights file cut
short) is one line.
"""

from __future__ import annotations

import os
from pathlib import Path

import huggingface_hub
import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    set_seed,
)

from cola_hf.errors import UsageError, one_line

LABELS = {0: "unacceptable", 1: "acceptable"}


def load_model(
    model_name_or_path: str, seed: int, cache_dir: str | None = None, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The checkpoint, its new classifier head drawn from `seed`: a search trial and a run of its recipe with
    the same seed start from the same weights."""
    set_seed(seed)
    return load_model_and_tokenizer(model_name_or_path, cache_dir, trust_remote_code)


def load_model_and_tokenizer(
    model_name_or_path: str, cache_dir: str | None = None, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The checkpoint's fast tokenizer and a 2-label classifier with CoLA's label names."""
    options = {"cache_dir": cache_dir, "trust_remote_code": trust_remote_code}
    local = os.path.isdir(model_name_or_path)
    if not local and (os.path.isabs(model_name_or_path) or model_name_or_path.startswith((".", "~"))):
        raise UsageError(f"model '{model_name_or_path}': no such directory (--model_name_or_path)")
    if local and not os.path.isfile(os.path.join(model_name_or_path, "config.json")):
        # Without config.json transformers guesses a tokenizer class and fails with a misleading error.
        raise UsageError(
            f"model '{model_name_or_path}': no config.json in this directory; expected a checkpoint "
            "written by save_pretrained"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, **options)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_name_or_path,
            num_labels=len(LABELS),
            id2label=LABELS,
            label2id={label: index for index, label in LABELS.items()},
            use_safetensors=None if trust_remote_code else True,
            # float32 whatever the checkpoint was saved in (transformers 5 loads in the saved dtype, and
            # DeepSpeed ZeRO saves bf16): AdamW's updates to bf16 weights round away, and evaluation would differ.
            # Mixed precision is the Trainer's autocast over float32 weights.
            dtype=torch.float32,
            **options,
        )
    except SafetensorError as err:
        raise UsageError(unreadable_weights(model_name_or_path, err)) from err
    except (OSError, ValueError) as err:  # transformers reports bad checkpoints with both
        if local:
            hint = ""
        elif huggingface_hub.constants.HF_HUB_OFFLINE:
            hint = (
                "; not a local directory, and HF_HUB_OFFLINE is set, so only the Hub cache was searched: pass a "
                "local checkpoint directory, or download it once with internet access"
            )
        else:
            hint = (
                "; not a local directory, and the Hub could not provide it (no such model, or no internet: pass a "
                "local checkpoint directory, or set HF_HUB_OFFLINE=1 to use the Hub cache)"
            )
        raise UsageError(f"model '{model_name_or_path}': cannot load ({one_line(err)}){hint}") from err
    return model, tokenizer


def unreadable_weights(model: str, err: SafetensorError) -> str:
    """One line for a checkpoint whose safetensors file cannot be read, naming the file where it is local."""
    damaged = [path for path in sorted(Path(model).glob("*.safetensors")) if not is_readable(path)]
    where = f"{damaged[0]} is" if damaged else f"model '{model}': its weights are"
    return (
        f"{where} damaged or incomplete ({one_line(err)}): a copy or download cut short? Copy or save the "
        "checkpoint again"
    )


def is_readable(path: Path) -> bool:
    """Whether safetensors opens the file: it checks the header against the file's length."""
    try:
        with safe_open(str(path), framework="pt"):
            return True
    except (SafetensorError, OSError):
        return False
