from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cnnlab.errors import CnnlabError
from cnnlab.models import MODELS, create_model, model_spec, parameter_count
from cnnlab.models.families.fast import global_max_pool, max_pool_2x2


@pytest.mark.parametrize(("name", "expected"), [("tutorial-mlp", 12_230_010), ("tutorial-cnn", 167_562)])
def test_parameter_counts_match_keras_at_cifar10_input(name, expected):
    assert parameter_count(create_model(name, (3, 32, 32), 10)) == expected


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 12, 16)])
def test_every_model_runs_forward_and_backward_with_finite_outputs(name, shape):
    model = create_model(name, shape, num_classes=7)
    x = torch.rand(4, *shape).contiguous(memory_format=torch.channels_last)
    logits = model(x)
    assert logits.shape == (4, 7) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.arange(4)).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)


def test_keras_initialisation_glorot_uniform_weights_and_zero_biases():
    model = create_model("tutorial-cnn", (3, 32, 32), 10, seed=3)
    limit = (6 / (3 * 9 + 32 * 9)) ** 0.5  # glorot bound for a 3x3 conv from 3 to 32 channels
    assert model.conv1.weight.abs().max() <= limit and model.conv1.weight.abs().max() > 0.9 * limit
    assert all((m.bias == 0).all() for m in (model.conv1, model.conv2, model.dense, model.classifier))
    again = create_model("tutorial-cnn", (3, 32, 32), 10, seed=3)
    assert torch.equal(model.conv2.weight, again.conv2.weight)


def test_cnn_refuses_inputs_below_its_minimum_size_naming_it():
    spec = model_spec("tutorial-cnn")
    create_model("tutorial-cnn", (1, spec.min_input_size, spec.min_input_size), 10)
    with pytest.raises(CnnlabError, match="at least 10x10"):
        create_model("tutorial-cnn", (1, 8, 8), 10)


def test_relu_after_pool_equals_the_tutorials_relu_before_pool():
    model = create_model("tutorial-cnn", (3, 32, 32), 10)
    x = torch.randn(2, 3, 32, 32)
    h = F.max_pool2d(F.relu(model.conv1(x)), 2)
    h = F.max_pool2d(F.relu(model.conv2(h)), 2)
    reference = model.classifier(F.relu(model.dense(h.flatten(1))))
    torch.testing.assert_close(model(x), reference)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(CnnlabError, match="tutorial-cnn"):
        create_model("resnet9000", (3, 32, 32), 10)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [(31, 31), (8, 9)])
def test_the_fast_nets_pool_matches_torchs_values_and_gradients_without_keeping_its_input(memory_format, dtype, size):
    x = torch.randn(3, 5, *size).round(decimals=1).to(dtype).contiguous(memory_format=memory_format)  # with ties
    ours, reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        pooled = max_pool_2x2(ours)
    expected = F.max_pool2d(reference, 2)
    grad = torch.randn_like(expected)
    pooled.backward(grad)
    expected.backward(grad)
    assert torch.equal(pooled, expected) and torch.equal(ours.grad, reference.grad)
    assert ours.grad.stride() == reference.grad.stride()
    assert [t.dtype for t in saved] == [torch.int64]  # the winners only, not the input


def test_the_fast_nets_global_max_pool_has_finite_compiled_bf16_gradients_equal_to_eager():
    # inductor's amax backward misses the maximum of a bf16 GELU's output and divides by zero matches
    # (pytorch/pytorch#186799); the pool takes torch.max's values when compiled
    def pooled(x: torch.Tensor) -> torch.Tensor:
        return global_max_pool(F.gelu(x))

    x = torch.randn(4, 8, 6, 6, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    grads = []
    for function in (pooled, torch.compile(pooled)):
        leaf = x.clone().requires_grad_()
        values = function(leaf)
        values.float().sum().backward()
        grads.append((values.detach(), leaf.grad))
    (eager, eager_grad), (compiled, compiled_grad) = grads
    assert torch.equal(eager, compiled) and torch.isfinite(compiled_grad).all()
    torch.testing.assert_close(compiled_grad.float(), eager_grad.float())
