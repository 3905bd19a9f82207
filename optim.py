"""
The two optimizers HRM trains with, written out so every step of the math is visible.

AdamATan2: Adam with m / (sqrt(v) + eps) replaced by atan2(m, sqrt(v)). atan2 is bounded and
well defined at v = 0, so there is no eps to tune (Everett et al. 2024, "Scaling Exponents Across
Parameterizations and Optimizers"). Same constructor and update as the `adam-atan2` package that
the HRM reference uses, but in plain PyTorch: no CUDA extension to build, runs on CPU too, and
accepts lr = 0 (the warmup schedule starts there).

SignSGD: the update the HRM reference applies to the puzzle embeddings.

Both take fp32 params only: nanoHRM keeps its weights in fp32 (bf16 exists only inside the forward).
"""

import math

import torch


def check_group(name, group):
    # checks each param group as add_param_group stores it (defaults filled in), so a group's own settings are
    # checked too. lr = 0 is legal: warmup starts there, and the update then only advances m, v and step
    for key in ("lr", "weight_decay"):
        if not group[key] >= 0.0:
            raise ValueError(f"{name}: {key} must be >= 0, got {group[key]}")
    betas = tuple(group.get("betas", (0.0, 0.0)))
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"{name}: betas must be two numbers in [0, 1), got {group['betas']}")
    # updates run in the param's dtype: bf16 weights would round small updates away, and a bf16 v could not
    # hold the (1 - beta2) * g^2 added to it
    dtypes = {p.dtype for p in group["params"]} - {torch.float32}
    if dtypes:
        raise ValueError(f"{name}: params must be float32, got {', '.join(sorted(map(str, dtypes)))}")


class AdamATan2(torch.optim.Optimizer):
    """
    Per parameter, with t its own step count (a param whose grad is None is skipped and its t does not move):
        p <- p * (1 - lr * weight_decay)
        m <- lerp(m, g, 1 - beta1)
        v <- lerp(v, g * g, 1 - beta2)
        p <- p - lr / (1 - beta1^t) * atan2(m, sqrt(v) / sqrt(1 - beta2^t))
    foreach=False runs the same ops one tensor at a time: the readable reference, and the baseline
    bench.py times the multi-tensor path against.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2, foreach=True):
        # an attribute, not a group setting, so loading a checkpoint cannot switch the code path
        self.foreach = foreach
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        check_group("AdamATan2", self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if not state:
                    # step is an fp32 scalar on the CPU, as in torch.optim.Adam: reading it for the
                    # bias corrections never waits on the GPU
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
            update = self._update_foreach if self.foreach else self._update_per_tensor
            if params:  # the foreach ops refuse empty lists
                update(params, group)
        return loss

    def _update_per_tensor(self, params, group):
        lr, weight_decay = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        for p in params:
            state = self.state[p]
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            state["step"] += 1
            t = state["step"].item()
            p.mul_(1 - lr * weight_decay)
            exp_avg.lerp_(p.grad, 1 - beta1)
            exp_avg_sq.lerp_(p.grad * p.grad, 1 - beta2)
            denom = exp_avg_sq.sqrt().div_(math.sqrt(1 - beta2 ** t))
            # atan2 written into denom, as the foreach path does: one param-sized buffer per tensor, not two
            update = torch.atan2(exp_avg, denom, out=denom).mul_(-lr / (1 - beta1 ** t))
            p.add_(update)

    def _update_foreach(self, params, group):
        # the same ops in the same order as _update_per_tensor, one launch per op for the whole list
        lr, weight_decay = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        steps = [s["step"] for s in states]
        grads = [p.grad for p in params]

        torch._foreach_add_(steps, 1)
        torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_lerp_(exp_avg_sqs, torch._foreach_mul(grads, grads), 1 - beta2)
        # params can be at different steps (a grad was None earlier), so the bias corrections are lists
        ts = [step.item() for step in steps]
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, [math.sqrt(1 - beta2 ** t) for t in ts])
        # torch has no _foreach_atan2. One atan2 per tensor, written in place into its denom, beats one
        # atan2 over torch.cat of all tensors: the cat copies m and denom once more (two extra passes
        # over all optimizer state, and two new buffers) to save one launch per tensor, about 40 for
        # HRM. For HRM's 27M params in 38 tensors the cat version of this stage measured 4x slower on CPU.
        for exp_avg, denom in zip(exp_avgs, denoms):
            torch.atan2(exp_avg, denom, out=denom)
        torch._foreach_mul_(denoms, [-lr / (1 - beta1 ** t) for t in ts])
        torch._foreach_add_(params, denoms)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # torch keeps the saved tensors themselves where dtype and device already match, so stepping would
        # write into the dict they came from (another optimizer's live state, say): copy them. step goes back
        # to the CPU, where step() keeps it, whatever map_location the checkpoint was loaded with.
        for state in self.state.values():
            state["step"] = state["step"].to("cpu", torch.float32, copy=True)
            state["exp_avg"] = state["exp_avg"].clone()
            state["exp_avg_sq"] = state["exp_avg_sq"].clone()


class SignSGD(torch.optim.Optimizer):
    """
    Sign-SGD with decoupled weight decay, state-free:
        p <- p * (1 - lr * weight_decay) - lr * sign(g)
    The HRM reference applies this only to the embedding rows of the puzzles in the batch. Given a
    whole embedding table, rows with a zero grad still get decayed, so hand it only the rows to update.
    """

    def __init__(self, params, lr, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        check_group("SignSGD", self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, weight_decay = group["lr"], group["weight_decay"]
            for p in group["params"]:  # in nanoHRM one (1, D) tensor: no foreach needed
                if p.grad is not None:
                    p.mul_(1 - lr * weight_decay).add_(torch.sign(p.grad), alpha=-lr)
        return loss
