"""Which words of a sentence pushed a classifier toward "acceptable" or "unacceptable": per-word attributions.

The quantity explained is the logit margin, logit(acceptable) - logit(unacceptable): positive scores push
toward "acceptable", negative toward "unacceptable". Two methods, both on the input word embeddings (the layer
every supported family has: `model.get_input_embeddings()`), with captum's `LayerIntegratedGradients`:

- `integrated_gradients` (Sundararajan et al. 2017): the path integral of the margin's gradient from a baseline
  to the sentence, approximated with `IG_STEPS` Gauss-Legendre points. The token scores sum to
  margin(sentence) - margin(baseline) up to the reported convergence delta (completeness).
- `gradient_x_input`: the same with one step at the sentence itself, gradient x (input - baseline): one forward
  and one backward pass; no completeness guarantee (its "delta" says how far it is from it).

The baseline is the sentence with every word piece replaced by the padding token and the special tokens
([CLS], [SEP], <s>, ...) kept: it asks "what did the words add to what the model makes of an empty frame".
Token scores are summed into words through the fast tokenizer's word ids (a slow tokenizer has none:
`UsageError`). Deterministic: the model runs in eval mode (no dropout), on the device it is on.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cola_hf.errors import UsageError
from cola_hf.training.inference import acceptable_index

METHODS = ("integrated_gradients", "gradient_x_input")
DEFAULT_METHOD = "integrated_gradients"
IG_STEPS = 16  # Gauss-Legendre points; docs/analysis.md gives the deltas this leaves on MiniLM
DEFAULT_BATCH_SIZE = 16  # sentences per pass; integrated gradients runs IG_STEPS x this through the model
BASELINE = "the sentence's special tokens kept, every word piece replaced by the padding token"
# A delta this large beside the margin change it should equal: the word scores are not to be trusted alone.
LARGE_DELTA = 0.1


@dataclass
class SentenceAttribution:
    """One sentence's words (as they appear in the text), their scores toward "acceptable", and the margins."""

    text: str
    words: list[str]
    scores: list[float]  # one per word, summed over its pieces; positive: toward "acceptable"
    margin: float  # logit(acceptable) - logit(unacceptable) of the sentence
    baseline_margin: float  # the same of the baseline (special tokens only, the rest padding)
    delta: float  # sum(scores) - (margin - baseline_margin): 0 for exact integrated gradients
    truncated_words: int  # words past --max_seq_length, never seen by the model (not in `words`)

    @property
    def large_delta(self) -> bool:
        return abs(self.delta) > LARGE_DELTA * max(1.0, abs(self.margin - self.baseline_margin))


def check_explainable(tokenizer: PreTrainedTokenizerBase) -> None:
    """Word ids need a fast tokenizer; one line saying so otherwise."""
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(
            f"cannot explain with {type(tokenizer).__name__}: a slow tokenizer has no word ids to sum pieces "
            "into words; save the checkpoint with its fast tokenizer (AutoTokenizer(..., use_fast=True))"
        )


def attribute_words(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    method: str = DEFAULT_METHOD,
    max_length: int = 128,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[SentenceAttribution]:
    """Per-word attributions of every sentence, in order."""
    LayerIntegratedGradients = _layer_integrated_gradients()  # noqa: N806 (a class)
    if method not in METHODS:
        raise UsageError(f"unknown attribution method {method!r}; expected one of {', '.join(METHODS)}")
    check_explainable(tokenizer)
    for text in texts:
        if not text.strip():
            raise UsageError("cannot explain an empty sentence; give each sentence at least one word")
    if not texts:
        return []
    device = next(model.parameters()).device
    target = acceptable_index(model)
    other = 1 - target

    def margin_of(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        return logits[:, target] - logits[:, other]

    embeddings = model.get_input_embeddings()
    explainer = LayerIntegratedGradients(margin_of, embeddings)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[SentenceAttribution] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start : start + batch_size])
            encoded = tokenizer(
                batch, truncation=True, max_length=max_length, padding=True, return_tensors="pt",
                return_special_tokens_mask=True, return_token_type_ids=False,
            )  # fmt: skip
            full = tokenizer(batch, truncation=False, add_special_tokens=False, return_attention_mask=False)
            ids = encoded["input_ids"].to(device)
            mask = encoded["attention_mask"].to(device)
            keep = encoded["special_tokens_mask"].bool().to(device) | (mask == 0)
            baseline = torch.where(keep, ids, torch.full_like(ids, pad_id))
            with torch.no_grad():
                baseline_margins = margin_of(baseline, mask)
            if method == "integrated_gradients":
                token_scores, deltas = explainer.attribute(
                    ids,
                    baselines=baseline,
                    additional_forward_args=(mask,),
                    n_steps=IG_STEPS,
                    method="gausslegendre",
                    return_convergence_delta=True,
                )
                token_scores = token_scores.float().sum(dim=-1).detach()
                with torch.no_grad():
                    margins = margin_of(ids, mask)
            else:
                token_scores, margins = _gradient_x_input(margin_of, embeddings, ids, baseline, mask)
                deltas = token_scores.sum(dim=1) - (margins - baseline_margins)
            token_scores, deltas = token_scores.cpu(), deltas.detach().cpu()
            margins, baseline_margins = margins.detach().cpu().tolist(), baseline_margins.cpu().tolist()
            for row, text in enumerate(batch):
                word_ids = encoded.word_ids(row)
                spans: dict[int, list[int]] = {}
                scores: dict[int, float] = {}
                for position, word in enumerate(word_ids):
                    if word is None:
                        continue
                    start_char, end_char = encoded.token_to_chars(row, position) or (0, 0)
                    span = spans.setdefault(word, [start_char, end_char])
                    span[0], span[1] = min(span[0], start_char), max(span[1], end_char)
                    scores[word] = scores.get(word, 0.0) + float(token_scores[row, position])
                order = sorted(spans)
                all_words = {word for word in full.word_ids(row) if word is not None}
                delta = float(deltas[row])
                results.append(
                    SentenceAttribution(
                        text=text,
                        words=[text[spans[word][0] : spans[word][1]] for word in order],
                        scores=[scores[word] for word in order],
                        margin=margins[row],
                        baseline_margin=baseline_margins[row],
                        delta=delta if math.isfinite(delta) else float("nan"),
                        truncated_words=len(all_words) - len(order),
                    )
                )
    finally:
        model.train(was_training)
        # captum's explainer holds itself in a reference cycle (through its inner IntegratedGradients): cut what
        # it holds of the model, so that the model goes as soon as the run lets it go, not at the next collection.
        explainer.forward_func = explainer.layer = explainer.ig = None
    return results


def _layer_integrated_gradients() -> type:
    """captum's class, imported on first use (captum imports matplotlib: only when explaining), in a thread of its
    own: importing captum leaves the importing frames in a reference cycle (an exception caught inside the
    import), and every frame of the stack that imports it with them, a run's and its model's included, alive
    until the collector runs. A new thread's stack holds nothing of the run; an import error is raised here."""
    if "captum.attr" not in sys.modules:
        importer = threading.Thread(target=_import_quietly, args=("captum.attr",), name="cola-import-captum")
        importer.start()
        importer.join()
    from captum.attr import LayerIntegratedGradients

    return LayerIntegratedGradients


def _import_quietly(module: str) -> None:
    with contextlib.suppress(ImportError):
        importlib.import_module(module)


def _gradient_x_input(
    margin_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    embeddings: torch.nn.Module,
    ids: torch.Tensor,
    baseline: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token gradient x (embedding - baseline embedding), and the margins: one forward, one backward."""
    captured: list[torch.Tensor] = []

    def keep_output(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        output.requires_grad_(True)
        captured.append(output)
        return output

    handle = embeddings.register_forward_hook(keep_output)
    try:
        with torch.enable_grad():
            margins = margin_of(ids, mask)
            (gradient,) = torch.autograd.grad(margins.sum(), captured[0])
    finally:
        handle.remove()
    with torch.no_grad():
        difference = embeddings(ids) - embeddings(baseline)
    return (gradient * difference).float().sum(dim=-1), margins


def sample_pairs(uids: Sequence[str], per_paradigm: int, seed: int) -> list[int]:
    """Rows of `per_paradigm` pairs drawn from each paradigm (all 67 of BLiMP), seeded; in row order."""
    rows_of: dict[str, list[int]] = {}
    for row, uid in enumerate(uids):
        rows_of.setdefault(uid, []).append(row)
    generator = np.random.default_rng(seed)
    chosen: list[int] = []
    for uid in sorted(rows_of):
        rows = rows_of[uid]
        chosen.extend(generator.choice(rows, size=min(per_paradigm, len(rows)), replace=False).tolist())
    return sorted(chosen)


def most_confidently_wrong(labels: np.ndarray, probabilities: np.ndarray, count: int) -> list[int]:
    """Rows of the `count` sentences whose P(acceptable) is furthest from their gold label, among the wrong ones."""
    wrong = np.flatnonzero((probabilities > 0.5).astype(int) != labels)
    distance = np.abs(probabilities[wrong] - labels[wrong])
    return wrong[np.argsort(-distance, kind="stable")][:count].tolist()
