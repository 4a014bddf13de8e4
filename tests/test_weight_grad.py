"""soka/steps.py WeightGradNorm (train.py --log-weight-grad): ‖∂L/∂W‖ over the adapted layers'
effective weights, one measure for every method, checked against autograd on a model whose
effective weights are leaves.

    python -m pytest -q tests/test_weight_grad.py
"""
import copy

import pytest
import torch
import torch.nn as nn

from model import ModelArgs, Transformer
from soka import adapters
from soka.steps import WeightGradNorm, loss_sum
from soka.tasks import IGNORE_INDEX

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32, max_seq_len=64)
TARGETS = ["wq", "wv", "w2"]
METHODS = ("soka", "lora", "pissa")


def base():
    torch.manual_seed(0)
    return Transformer(ARGS)


def adapted(model, method):
    m = copy.deepcopy(model)
    adapters.inject(m, method, TARGETS, rank=None if method == "soka" else 4, impl="reference", verbose=False)
    return m


def batch(seed=0, rows=4, length=24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ARGS.vocab_size, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :length // 3] = IGNORE_INDEX                       # a prompt the loss skips
    return ids, labels


def answer_tokens(labels):
    return float((labels[:, 1:] != IGNORE_INDEX).sum())


def logged_norm(model, micro_batches):
    """What train.py logs: the hooks' norm after the step's micro-batches, each loss over the step's
    answer tokens; and the norm of the factors' own gradients."""
    tracker = WeightGradNorm(adapters.adapter_layers(model))
    n_tok = sum(answer_tokens(labels) for _, labels in micro_batches)
    for ids, labels in micro_batches:
        (loss_sum(model, ids, labels) / n_tok).backward()
    tracker.remove()
    factors = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.requires_grad))
    return tracker.pop(), float(factors)


def autograd_norm(model, ids, labels):
    """‖∂L/∂W‖ by autograd: a copy of `model` without adapters, each adapted weight replaced by its
    effective weight W_res + ΔW as a leaf."""
    plain = base()
    leaves = []
    for name, layer in adapters.adapter_layers(model):
        w = nn.Parameter(layer.merged_weight().detach().clone())
        plain.get_submodule(name).weight = w
        leaves.append(w)
    for p in plain.parameters():
        p.requires_grad_(any(p is w for w in leaves))
    loss = loss_sum(plain, ids, labels) / answer_tokens(labels)
    grads = torch.autograd.grad(loss, leaves)
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))


def stepped(model):
    """One normalized gradient step on every factor: LoRA's B is no longer zero, no layer is at its
    initialization."""
    ids, labels = batch(5)
    loss_sum(model, ids, labels).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p -= 0.1 * p.grad / (p.grad.norm() + 1e-12)
                p.grad = None
    return model


@pytest.mark.parametrize("recompute", [None, "checkpointing", "recompute_swiglu"])
@pytest.mark.parametrize("method", METHODS)
def test_the_logged_norm_is_the_gradient_of_the_effective_weights(method, recompute):
    """After a step, and with blocks or SwiGLU outputs recomputed in backward (train.py's options)."""
    model = stepped(adapted(base(), method))
    if recompute:
        setattr(model, recompute, True)
    ids, labels = batch()
    logged, _ = logged_norm(model, [(ids, labels)])
    assert logged > 0
    assert logged == pytest.approx(autograd_norm(model, ids, labels), rel=1e-4)


def test_every_method_logs_the_same_number_where_their_factor_gradients_differ():
    """At initialization W_res + ΔW₀ = W for all three methods (up to float rounding), so ∂L/∂W is
    the same; the gradients of their own factors are not."""
    ids, labels = batch(1)
    model = base()
    logged, factors = zip(*(logged_norm(adapted(model, m), [(ids, labels)]) for m in METHODS))
    assert max(logged) / min(logged) < 1 + 1e-4
    assert max(factors) / min(factors) > 1.5


def test_micro_batches_add_up_to_the_whole_batch():
    model = adapted(base(), "soka")
    ids, labels = batch(2, rows=6)
    whole, _ = logged_norm(model, [(ids, labels)])
    model.zero_grad()
    parts, _ = logged_norm(model, [(ids[:2], labels[:2]), (ids[2:], labels[2:])])
    assert parts == pytest.approx(whole, rel=1e-5)


def test_forwards_without_backward_leave_nothing_behind():
    """The held-out loss and generation run under no_grad: no hook is registered, nothing is kept."""
    model = adapted(base(), "lora")
    tracker = WeightGradNorm(adapters.adapter_layers(model))
    with torch.no_grad():
        model(batch()[0])
    assert tracker.grads == {} and tracker.pop() == 0.0
    tracker.remove()
    ids, labels = batch()
    loss_sum(model, ids, labels).backward()
    assert tracker.grads == {}                                      # removed: no hooks fire
