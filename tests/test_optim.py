"""
Tests for optim.py. Each optimizer is checked against a float64 reference written here from the
update formulas, so a mistake in optim.py cannot hide in a shared helper.
"""

import copy
import io
import math
import os
import sys

import pytest
import torch

# the repo root, so plain `pytest` finds optim.py as well as `python -m pytest`
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from optim import AdamATan2, SignSGD  # noqa: E402

SHAPES = [(), (7,), (5, 3), (2, 3, 4)]
ADAM_DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2)  # those of the adam-atan2 package
ADAM_GROUPS = [
    dict(),  # the package defaults, taken from the constructor
    dict(lr=3e-2, betas=(0.8, 0.95), weight_decay=0.5),  # large lr * wd: decaying before vs after the update shows
    dict(lr=1e-2, betas=(0.0, 0.0), weight_decay=0.0),  # edge betas: m = g, v = g * g
]
SIGN_GROUPS = [
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=3e-3, weight_decay=0.0),
]


def warmup(step):
    # lr = 0 for the first 4 steps, then a linear ramp to the group's lr, as train.py's schedule does
    return min(1.0, max(0, step - 3) / 10)


def make_problem(groups, steps, seed=0):
    """Per group: its hyperparameters and, per shape, (initial fp32 param, the list of its grads per step)."""
    gen = torch.Generator().manual_seed(seed)
    problem = []
    for hyperparameters in groups:
        tensors = []
        for i, shape in enumerate(SHAPES):
            param = (0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)).float()
            # the whole gradient sequence up front; the scale jumps over 1e-3..10 between steps so
            # atan2 sees both |m| << sqrt(v) and |m| >> sqrt(v)
            grads = torch.randn((steps, *shape), generator=gen, dtype=torch.float64)
            grads *= (10 ** (4 * torch.rand(steps, generator=gen, dtype=torch.float64) - 3)).view(-1, *[1] * len(shape))
            if len(shape) > 0:
                grads.view(steps, -1)[:, 0] = 0.0  # an element whose grad is always 0: atan2(0, 0) must give 0
            grads = list(grads.float())
            if i == 1:
                # no grad every third step: the param is skipped and its own step count falls behind
                grads = [None if step % 3 == 2 else g for step, g in enumerate(grads)]
            tensors.append((param, grads))
        problem.append((hyperparameters, tensors))
    return problem


def run(optimizer, params, problem, start, stop):
    """Steps start..stop-1 of the problem, with the warmup schedule written into param_groups each step."""
    for step in range(start, stop):
        for group, (hyperparameters, tensors) in zip(optimizer.param_groups, problem):
            group["lr"] = hyperparameters.get("lr", ADAM_DEFAULTS["lr"]) * warmup(step)
        for p, (_, grads) in zip(params, [t for _, tensors in problem for t in tensors]):
            p.grad = None if grads[step] is None else grads[step].clone()
        optimizer.step()


def make_params(problem):
    return [p.clone().requires_grad_() for _, tensors in problem for p, _ in tensors]


def group_params(params, problem):
    groups, i = [], 0
    for hyperparameters, tensors in problem:
        groups.append(dict(params=params[i:i + len(tensors)], **hyperparameters))
        i += len(tensors)
    return groups


def adam_atan2_reference(param, grads, lrs, lr_scale, betas, weight_decay):
    """float64 AdamATan2, rounded to fp32 after each step as the optimizer stores it."""
    beta1, beta2 = betas
    p = param.double()
    m, v, t = torch.zeros_like(p), torch.zeros_like(p), 0
    for g, lr in zip(grads, lrs):
        if g is None:
            continue
        lr, t, g = lr * lr_scale, t + 1, g.double()
        p = p * (1 - lr * weight_decay)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p = p - lr / (1 - beta1 ** t) * torch.atan2(m, v.sqrt() / math.sqrt(1 - beta2 ** t))
        p = p.to(param.dtype).double()
    return p


def sign_sgd_reference(param, grads, lrs, lr_scale, weight_decay):
    p = param.double()
    for g, lr in zip(grads, lrs):
        if g is None:
            continue
        lr = lr * lr_scale
        p = p * (1 - lr * weight_decay) - lr * torch.sign(g.double())
        p = p.to(param.dtype).double()
    return p


def assert_matches_reference(actual, reference):
    """actual: fp32 params, reference: the same in float64."""
    a = torch.cat([a.detach().double().flatten() for a in actual])
    r = torch.cat([r.flatten() for r in reference])
    # fp32 compute vs float64: ~1 ulp (6e-8 relative) per op per step, summed over 100 steps
    # on params ~0.1 stays well below 1e-6; the smallest bug tried (decay after the update)
    # moves params by > 1e-4
    torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("foreach", [True, False])
def test_adam_atan2_matches_float64_reference(foreach):
    steps = 100
    problem = make_problem(ADAM_GROUPS, steps)
    params = make_params(problem)
    optimizer = AdamATan2(group_params(params, problem), foreach=foreach)
    run(optimizer, params, problem, 0, steps)

    lrs = [warmup(step) for step in range(steps)]
    reference = []
    for hyperparameters, tensors in problem:
        hp = {**ADAM_DEFAULTS, **hyperparameters}
        for p0, grads in tensors:
            reference.append(adam_atan2_reference(p0, grads, lrs, hp["lr"], hp["betas"], hp["weight_decay"]))
    assert_matches_reference(params, reference)
    assert optimizer.state[params[1]]["step"].item() == steps - steps // 3  # skipped when grad is None


def test_adam_atan2_foreach_equals_per_tensor():
    # on CPU the foreach ops run the same per-tensor kernels in the same order, so the two paths agree
    # bitwise (on CUDA the fused foreach kernels may differ in the last bit)
    steps = 30
    problem = make_problem(ADAM_GROUPS, steps, seed=1)
    results = []
    for foreach in (True, False):
        params = make_params(problem)
        run(AdamATan2(group_params(params, problem), foreach=foreach), params, problem, 0, steps)
        results.append(params)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("through_file", [True, False])
@pytest.mark.parametrize("foreach", [True, False])
def test_adam_atan2_state_dict_round_trip(foreach, through_file):
    steps = 100
    problem = make_problem(ADAM_GROUPS, steps, seed=2)

    params = make_params(problem)
    uninterrupted = AdamATan2(group_params(params, problem), foreach=foreach)
    run(uninterrupted, params, problem, 0, steps)

    first = make_params(problem)
    first_optimizer = AdamATan2(group_params(first, problem), foreach=foreach)
    run(first_optimizer, first, problem, 0, steps // 2)
    checkpoint = dict(params=[p.detach() for p in first], optimizer=first_optimizer.state_dict())
    if through_file:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        buffer.seek(0)
        checkpoint = torch.load(buffer)
    before = copy.deepcopy(first_optimizer.state_dict()["state"])
    resumed = [p.clone().requires_grad_() for p in checkpoint["params"]]
    optimizer = AdamATan2(group_params(resumed, problem), foreach=foreach)
    optimizer.load_state_dict(checkpoint["optimizer"])
    run(optimizer, resumed, problem, steps // 2, steps)
    # loaded straight from another optimizer's state_dict, the new state must not alias the old one
    after = first_optimizer.state_dict()["state"]
    for i in before:
        for key in before[i]:
            assert torch.equal(before[i][key], after[i][key])

    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(uninterrupted.state[a][key], optimizer.state[b][key])


def test_lr_zero_leaves_params_unchanged():
    # lr = 0 (the first warmup steps) with weight decay on: decay is lr * wd, so 0 too
    torch.manual_seed(0)
    p0 = torch.randn(4, 5)
    for optimizer_class in (AdamATan2, SignSGD):
        p = p0.clone().requires_grad_()
        optimizer = optimizer_class([p], lr=0.0, weight_decay=0.1)
        for _ in range(3):
            p.grad = torch.randn(4, 5)
            optimizer.step()
        assert torch.equal(p.detach(), p0)
        if optimizer_class is AdamATan2:
            assert optimizer.state[p]["step"].item() == 3
            assert optimizer.state[p]["exp_avg"].abs().sum() > 0


def test_param_without_grad_is_skipped():
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    for optimizer in (AdamATan2([a, b], lr=0.1), SignSGD([a, b], lr=0.1)):
        a.grad = torch.ones(3)
        optimizer.step()
        assert torch.equal(b.detach(), torch.ones(3))
        assert b not in optimizer.state
    assert (a.detach() < 1).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1e-3), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(betas=(1.0, 0.999)), "betas"),
    (dict(betas=(0.9, 1.0)), "betas"),
    (dict(betas=(-0.1, 0.999)), "betas"),
    (dict(betas=(0.9,)), "betas"),
    (dict(weight_decay=-0.1), "weight_decay"),
])
def test_adam_atan2_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamATan2([torch.zeros(2, requires_grad=True)], **kwargs)
    # a group's own setting is checked too, not only the constructor's defaults
    with pytest.raises(ValueError, match=match):
        AdamATan2([dict(params=[torch.zeros(2, requires_grad=True)], **kwargs)])


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1e-3), "lr"),
    (dict(lr=1e-3, weight_decay=-0.1), "weight_decay"),
])
def test_sign_sgd_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SignSGD([torch.zeros(2, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("optimizer_class", [AdamATan2, SignSGD])
def test_params_other_than_float32_are_refused(optimizer_class):
    # the updates run in the param's dtype: in bf16 small ones would be rounded away without a word
    params = [torch.zeros(2, requires_grad=True), torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)]
    with pytest.raises(ValueError, match="params must be float32, got torch.bfloat16"):
        optimizer_class(params, lr=1e-3)
    with pytest.raises(ValueError, match="got torch.float64"):  # a group's own params too
        optimizer_class([dict(params=params[:1]), dict(params=[torch.zeros(2, dtype=torch.float64)])], lr=1e-3)


def test_sign_sgd_matches_float64_reference():
    steps = 20
    problem = make_problem(SIGN_GROUPS, steps, seed=3)
    params = make_params(problem)
    optimizer = SignSGD(group_params(params, problem), lr=1.0)  # every group sets its own lr
    run(optimizer, params, problem, 0, steps)

    lrs = [warmup(step) for step in range(steps)]
    reference = [sign_sgd_reference(p0, grads, lrs, hp["lr"], hp["weight_decay"])
                 for hp, tensors in problem for p0, grads in tensors]
    assert_matches_reference(params, reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    steps = 30
    problem = make_problem(ADAM_GROUPS, steps, seed=4)
    cpu = make_params(problem)
    run(AdamATan2(group_params(cpu, problem), foreach=False), cpu, problem, 0, steps)
    cuda_problem = [(hp, [(p.cuda(), [None if g is None else g.cuda() for g in grads]) for p, grads in tensors])
                    for hp, tensors in problem]
    cuda = make_params(cuda_problem)
    run(AdamATan2(group_params(cuda, cuda_problem)), cuda, cuda_problem, 0, steps)
    for a, b in zip(cpu, cuda):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-5, atol=1e-6)
