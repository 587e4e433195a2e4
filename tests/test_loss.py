"""The step's loss: each sentence weighs 1 / (sentences in the step), however the step is split."""

import pytest
import torch

from cola_hf.training.trainer import sentence_mean_loss

pytestmark = pytest.mark.lowest


def test_micro_batches_of_a_step_sum_to_the_mean_over_the_whole_step():
    torch.manual_seed(0)
    logits = torch.randn(15, 2, requires_grad=True)
    labels = torch.randint(0, 2, (15,))
    whole = torch.nn.functional.cross_entropy(logits, labels)
    (expected,) = torch.autograd.grad(whole, logits)
    # 8 + 7, as accumulation splits a last batch of 15; the Trainer passes the step's count to every part.
    parts = sum(
        sentence_mean_loss({"logits": logits[part]}, labels[part], num_items_in_batch=torch.tensor(15))
        for part in (slice(0, 8), slice(8, 15))
    )
    (got,) = torch.autograd.grad(parts, logits)
    torch.testing.assert_close(parts, whole, atol=1e-7, rtol=0)
    torch.testing.assert_close(got, expected, atol=1e-8, rtol=0)
    # What the model's own mean per micro-batch, halved by the Trainer, weighs instead: not the step's mean.
    mean_of_means = sum(
        torch.nn.functional.cross_entropy(logits[p], labels[p]) / 2 for p in (slice(0, 8), slice(8, 15))
    )
    assert not torch.allclose(mean_of_means, whole, atol=1e-4)
