"""
The Hierarchical Reasoning Model (HRM, Wang et al. 2025, arXiv 2506.21734) for Sudoku, in one file.

Two recurrent transformer modules: a slow high-level module H and a fast low-level module L. One
"segment" runs H_cycles x L_cycles updates of (z_H, z_L); only the last L and the last H update carry
gradient (the 1-step gradient). Segments repeat up to halt_max_steps times, and a Q head on z_H decides
when to halt (adaptive computation time, ACT), trained with Q-learning targets.

Read top to bottom: config, building blocks (init, norm, rotary, attention + its Triton kernel, MLP,
block), the reasoning module, the full model (one segment, the ACT step, the loss, batch solving),
then the FLOP count.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from _kernel_draft import HAS_TRITON, fused_attention, sdpa_attention


@dataclass
class HRMConfig:
    # Defaults are the paper's Sudoku-Extreme model: 27,275,266 parameters without the puzzle embedding.
    vocab_size: int = 11          # token 0 = pad (unused for Sudoku), 1 = blank, 2..10 = digits 1..9
    seq_len: int = 81             # Sudoku cells; one puzzle-embedding position is prepended
    hidden_size: int = 512
    num_heads: int = 8
    expansion: float = 4.0
    H_layers: int = 4
    L_layers: int = 4
    H_cycles: int = 2
    L_cycles: int = 2
    halt_max_steps: int = 16
    halt_exploration_prob: float = 0.1
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Switches. The defaults reproduce the paper; the alternatives are measured in README.
    act: str = 'q'                # 'q': Q-head halting (paper) | 'fixed': always halt_max_steps segments, no Q head
    q_target: bool = True         # the extra no-grad forward giving the Q-continue target (TRM drops it)
    grad_mode: str = '1step'      # '1step': only the last L and H update get gradient | 'full': backprop the segment
    attn_mask: str = 'none'       # 'none': full attention | 'sudoku': each cell sees its row, column and box peers
    loss: str = 'stablemax'       # 'stablemax' (paper) | 'softmax'
    attn_impl: str = 'auto'       # 'auto': Triton kernel on CUDA, SDPA elsewhere | 'triton' | 'sdpa'

    def __post_init__(self):
        choices = dict(act=('q', 'fixed'), grad_mode=('1step', 'full'), attn_mask=('none', 'sudoku'),
                       loss=('stablemax', 'softmax'), attn_impl=('auto', 'triton', 'sdpa'))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.halt_max_steps < 1 or min(self.H_cycles, self.L_cycles, self.H_layers, self.L_layers) < 1:
            raise ValueError("halt_max_steps, H/L_cycles and H/L_layers must all be >= 1")


# -----------------------------------------------------------------------------
# building blocks

def trunc_normal_(tensor, std=1.0, lower=-2.0, upper=2.0):
    """Normal truncated at [lower, upper] standard deviations, rescaled so the result has std `std`
    (truncation alone would shrink it by ~12%). This is the init HRM uses everywhere."""
    with torch.no_grad():
        if std == 0:
            return tensor.zero_()
        cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
        pdf = lambda x: math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        mass = cdf(upper) - cdf(lower)
        truncated_var = 1 + (lower * pdf(lower) - upper * pdf(upper)) / mass - ((pdf(lower) - pdf(upper)) / mass) ** 2
        scale = std / math.sqrt(truncated_var)
        # inverse-CDF sampling: uniform in (cdf(lower), cdf(upper)) mapped through erfinv
        tensor.uniform_(2 * cdf(lower) - 1, 2 * cdf(upper) - 1).erfinv_().mul_(math.sqrt(2) * scale)
        return tensor.clamp_(lower * scale, upper * scale)


class CastedLinear(nn.Module):
    """Linear layer with fp32 master weights, computed in the input's dtype (bf16 on GPU)."""

    def __init__(self, in_features, out_features, bias=False):
        super().__init__()
        # LeCun normal: keeps activations at unit variance through the residual-free recurrences
        self.weight = nn.Parameter(trunc_normal_(torch.empty(out_features, in_features), std=in_features ** -0.5))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


def rms_norm(x, eps):
    # In fp32: the post-norm sits on the recurrent state, and bf16 variance sums lose too much.
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotary_tables(seq_len, head_dim, theta):
    """cos and sin tables, (seq_len, head_dim), for the rotate-half form of RoPE."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x, cos, sin):
    # x: (B, S, H, D); rotation computed in fp32, as the reference does
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


def sudoku_attention_mask(puzzle_emb_len=1):
    """(S, S) bool, True = query may attend key. Cells see their row, column and box peers and
    themselves; the puzzle-embedding prefix sees and is seen by every position."""
    idx = torch.arange(81)
    row, col = idx // 9, idx % 9
    box = (row // 3) * 3 + col // 3
    peers = (row[:, None] == row[None]) | (col[:, None] == col[None]) | (box[:, None] == box[None])
    S = 81 + puzzle_emb_len
    mask = torch.ones(S, S, dtype=torch.bool)
    mask[puzzle_emb_len:, puzzle_emb_len:] = peers
    return mask


class Attention(nn.Module):
    """Non-causal multi-head self-attention with RoPE. The math is F.scaled_dot_product_attention;
    on CUDA the same math runs fused in the Triton kernel above (fused_attention)."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.qkv_proj = CastedLinear(config.hidden_size, 3 * config.hidden_size)
        self.o_proj = CastedLinear(config.hidden_size, config.hidden_size)

    def forward(self, x, cos, sin, mask, use_triton):
        B, S, D = x.shape
        q, k, v = self.qkv_proj(x).view(B, S, 3, self.num_heads, self.head_dim).unbind(2)  # 3 x (B, S, H, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = fused_attention(q, k, v, mask) if use_triton else sdpa_attention(q, k, v, mask)  # (B, S, H, hd)
        return self.o_proj(y.reshape(B, S, D))


class SwiGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        # 2/3 keeps the parameter count of a 4x MLP; rounding up to 256 keeps matmuls tile-friendly
        inter = 256 * math.ceil(round(config.expansion * config.hidden_size * 2 / 3) / 256)
        self.gate_up_proj = CastedLinear(config.hidden_size, 2 * inter)
        self.down_proj = CastedLinear(inter, config.hidden_size)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """Post-norm transformer block (norm after each residual add, as in HRM)."""

    def __init__(self, config):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.attn = Attention(config)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin, mask, use_triton):
        x = rms_norm(x + self.attn(x, cos, sin, mask, use_triton), self.eps)
        return rms_norm(x + self.mlp(x), self.eps)


class ReasoningModule(nn.Module):
    """The H or the L module: a stack of blocks whose input is the state plus an injected signal."""

    def __init__(self, config, n_layers):
        super().__init__()
        self.layers = nn.ModuleList(Block(config) for _ in range(n_layers))

    def forward(self, z, injection, cos, sin, mask, use_triton):
        z = z + injection
        for layer in self.layers:
            z = layer(z, cos, sin, mask, use_triton)
        return z


# -----------------------------------------------------------------------------
# the model

class Carry(NamedTuple):
    """What persists between training steps: the recurrent states and the puzzle each row is on."""
    z_H: torch.Tensor      # (B, S, D)
    z_L: torch.Tensor      # (B, S, D)
    steps: torch.Tensor    # (B,) int32 segments run on the current puzzle
    halted: torch.Tensor   # (B,) bool: the row takes a new puzzle at the next step
    inputs: torch.Tensor   # (B, 81) tokens of the current puzzle
    labels: torch.Tensor   # (B, 81) tokens of its solution


class HRM(nn.Module):

    def __init__(self, config, dtype=torch.float32):
        super().__init__()
        self.config = config
        self.forward_dtype = dtype  # bf16 on GPU, fp32 on CPU; weights stay fp32
        D = config.hidden_size
        self.puzzle_emb_len = 1
        self.embed_scale = math.sqrt(D)
        self.embed_tokens = nn.Parameter(trunc_normal_(torch.empty(config.vocab_size, D), std=1 / self.embed_scale))
        # Sudoku has a single puzzle identifier, so the puzzle embedding is one learned prefix vector.
        # Zero init as in the reference; it is trained by sign-SGD (optim.SignSGD), not Adam.
        self.puzzle_emb = nn.Parameter(torch.zeros(1, D))
        self.H_level = ReasoningModule(config, config.H_layers)
        self.L_level = ReasoningModule(config, config.L_layers)
        self.lm_head = CastedLinear(D, config.vocab_size)
        if config.act == 'q':
            self.q_head = CastedLinear(D, 2, bias=True)
            with torch.no_grad():  # start near "never halt" (sigmoid(-5) = 0.007) so early training runs long
                self.q_head.weight.zero_()
                self.q_head.bias.fill_(-5)
        # Fixed random initial states, shared by all puzzles (buffers: saved, not trained)
        self.register_buffer('H_init', trunc_normal_(torch.empty(D), std=1))
        self.register_buffer('L_init', trunc_normal_(torch.empty(D), std=1))
        cos, sin = rotary_tables(config.seq_len + self.puzzle_emb_len, D // config.num_heads, config.rope_theta)
        self.register_buffer('rope_cos', cos, persistent=False)
        self.register_buffer('rope_sin', sin, persistent=False)
        mask = sudoku_attention_mask(self.puzzle_emb_len) if config.attn_mask == 'sudoku' else None
        self.register_buffer('attn_mask', mask, persistent=False)

    def num_params(self, with_puzzle_emb=False):
        """The paper counts parameters without the puzzle embedding."""
        n = sum(p.numel() for p in self.parameters())
        return n if with_puzzle_emb else n - self.puzzle_emb.numel()

    def uses_triton(self, device):
        impl = self.config.attn_impl
        if impl == 'auto':
            return HAS_TRITON and device.type == 'cuda'
        if impl == 'triton' and not HAS_TRITON:
            raise RuntimeError("attn_impl='triton' but triton is not installed")
        return impl == 'triton'

    def embed(self, inputs):
        B = inputs.shape[0]
        tokens = F.embedding(inputs.long(), self.embed_tokens)                     # (B, 81, D)
        prefix = self.puzzle_emb.expand(B, -1)[:, None, :]                          # (B, 1, D)
        return (self.embed_scale * torch.cat((prefix, tokens), dim=1)).to(self.forward_dtype)  # (B, S, D)

    def segment(self, z_H, z_L, inputs):
        """One segment: H_cycles x L_cycles updates. Returns new states, logits and Q logits."""
        cfg = self.config
        x = self.embed(inputs)
        ctx = (self.rope_cos, self.rope_sin, self.attn_mask, self.uses_triton(x.device))
        # The 1-step gradient: every update but the last L and the last H one runs without grad, so
        # memory and backward cost do not grow with the number of cycles (the paper's O(1) memory).
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.grad_mode == 'full'):
            for h in range(cfg.H_cycles):
                for l in range(cfg.L_cycles):
                    if h < cfg.H_cycles - 1 or l < cfg.L_cycles - 1:
                        z_L = self.L_level(z_L, z_H + x, *ctx)
                if h < cfg.H_cycles - 1:
                    z_H = self.H_level(z_H, z_L, *ctx)
        z_L = self.L_level(z_L, z_H + x, *ctx)
        z_H = self.H_level(z_H, z_L, *ctx)
        logits = self.lm_head(z_H[:, self.puzzle_emb_len:])                        # (B, 81, V)
        q_logits = self.q_head(z_H[:, 0]).float() if cfg.act == 'q' else None       # (B, 2): halt, continue
        return z_H, z_L, logits, q_logits

    def initial_carry(self, batch_size, device):
        S, D = self.config.seq_len + self.puzzle_emb_len, self.config.hidden_size
        z = torch.zeros(batch_size, S, D, dtype=self.forward_dtype, device=device)
        tokens = torch.zeros(batch_size, self.config.seq_len, dtype=torch.long, device=device)
        # every row starts halted, so the first step loads a puzzle into each
        return Carry(z, z.clone(), torch.zeros(batch_size, dtype=torch.int32, device=device),
                     torch.ones(batch_size, dtype=torch.bool, device=device), tokens, tokens.clone())

    def forward(self, carry, inputs, labels, min_halt_steps=None):
        """One ACT training step: rows that halted last step take the new puzzle (inputs, labels, (B, 81)
        tokens) and restart from the initial states; every row then runs one segment.
        min_halt_steps (B,) is the exploration draw (see exploration_draw); train.py passes its rank's
        slice of one global draw so DDP matches a single process. Returns the new carry and the
        outputs for loss()."""
        cfg = self.config
        reset = carry.halted
        z_H = torch.where(reset[:, None, None], self.H_init.to(self.forward_dtype), carry.z_H)
        z_L = torch.where(reset[:, None, None], self.L_init.to(self.forward_dtype), carry.z_L)
        steps = torch.where(reset, 0, carry.steps)
        inputs = torch.where(reset[:, None], inputs, carry.inputs)
        labels = torch.where(reset[:, None], labels, carry.labels)

        z_H, z_L, logits, q_logits = self.segment(z_H, z_L, inputs)
        # the carry never takes gradient into the next step: segments are trained one at a time
        z_H, z_L = z_H.detach(), z_L.detach()
        outputs = {'logits': logits}
        with torch.no_grad():
            steps = steps + 1
            is_last = steps >= cfg.halt_max_steps
            halted = is_last
            if cfg.act == 'q':
                q_halt, q_continue = q_logits.unbind(-1)
                outputs['q_halt_logits'], outputs['q_continue_logits'] = q_halt, q_continue
                # At eval every row runs halt_max_steps segments so a batch halts together.
                if self.training and cfg.halt_max_steps > 1:
                    halted = halted | (q_halt > q_continue)
                    if min_halt_steps is None:
                        min_halt_steps = self.exploration_draw(steps.shape[0], steps.device)
                    halted = halted & (steps >= min_halt_steps)
                    if cfg.q_target:
                        # Bootstrapped target for Q-continue: the value of the next segment, from a
                        # second forward with the current weights (no replay buffer, no target net:
                        # the large batch plays the role of many parallel environments).
                        next_q = self.segment(z_H, z_L, inputs)[3]
                        next_halt, next_continue = next_q.unbind(-1)
                        outputs['target_q_continue'] = torch.sigmoid(
                            torch.where(is_last, next_halt, torch.maximum(next_halt, next_continue)))
        return Carry(z_H, z_L, steps, halted, inputs, labels), outputs

    def exploration_draw(self, batch_size, device, generator=None):
        """ACT exploration: with probability halt_exploration_prob a row must run at least a uniform
        2..halt_max_steps segments before it may halt; other rows get 0 (no minimum)."""
        cfg = self.config
        explore = torch.rand(batch_size, device=device, generator=generator) < cfg.halt_exploration_prob
        minimum = torch.randint(2, cfg.halt_max_steps + 1, (batch_size,), device=device, generator=generator)
        return explore * minimum

    def loss(self, carry, outputs):
        """Summed over the batch (the caller divides by the global batch size). Metrics are device
        tensors of sums over the rows that halted this step, so reading them needs no sync here."""
        logits, labels = outputs['logits'], carry.labels
        lm_loss = cross_entropy(logits, labels, self.config.loss).mean(-1).sum()  # each puzzle averaged over its 81 cells
        with torch.no_grad():
            cell_correct = logits.argmax(-1) == labels                            # (B, 81)
            exact = cell_correct.all(-1)                                          # (B,)
            done = carry.halted
            metrics = {
                'count': done.sum(),
                'cell_acc': (cell_correct.float().mean(-1) * done).sum(),
                'exact_acc': (exact & done).sum(),
                'steps': (carry.steps * done).sum(),
                'lm_loss': lm_loss.detach(),
            }
        loss = lm_loss
        if 'q_halt_logits' in outputs:
            q_halt = outputs['q_halt_logits']
            # Q-halt learns "is the current answer entirely right"
            q_halt_loss = F.binary_cross_entropy_with_logits(q_halt, exact.float(), reduction='sum')
            loss = loss + 0.5 * q_halt_loss
            metrics['q_halt_loss'] = q_halt_loss.detach()
            metrics['q_halt_acc'] = (((q_halt >= 0) == exact) & done).sum()
            if 'target_q_continue' in outputs:
                q_continue_loss = F.binary_cross_entropy_with_logits(
                    outputs['q_continue_logits'], outputs['target_q_continue'], reduction='sum')
                loss = loss + 0.5 * q_continue_loss
                metrics['q_continue_loss'] = q_continue_loss.detach()
        return loss, metrics

    @torch.no_grad()
    def solve(self, inputs, segments=None, halt=False, trace=False):
        """Batch inference on (B, 81) tokens. By default every row runs `segments` (= halt_max_steps)
        segments, as the paper evaluates. With halt=True a row's answer is frozen at the first segment
        where the Q head says halt (what ACT would do). Returns predicted tokens (B, 81), the segments
        each row used (B,), the final q_halt logits (or None), and with trace=True the predictions
        after every segment (T, B, 81)."""
        segments = segments or self.config.halt_max_steps
        B, device = inputs.shape[0], inputs.device
        z_H = self.H_init.to(self.forward_dtype).expand(B, self.config.seq_len + 1, -1)
        z_L = self.L_init.to(self.forward_dtype).expand_as(z_H)
        preds = torch.zeros_like(inputs, dtype=torch.long)
        steps = torch.zeros(B, dtype=torch.int32, device=device)
        running = torch.ones(B, dtype=torch.bool, device=device)
        q_halt, history = None, []
        for step in range(segments):
            z_H, z_L, logits, q_logits = self.segment(z_H, z_L, inputs)
            preds = torch.where(running[:, None], logits.argmax(-1), preds)
            steps = steps + running.int()
            if q_logits is not None:
                q_halt = torch.where(running, q_logits[:, 0], q_halt) if q_halt is not None else q_logits[:, 0]
                if halt:
                    running = running & ~(q_logits[:, 0] > q_logits[:, 1])
            if trace:
                history.append(preds.clone())
            if halt and not running.any():  # a host sync, but only on this opt-in path
                break
        return preds, steps, q_halt, (torch.stack(history) if trace else None)


def cross_entropy(logits, labels, kind):
    """Per-cell cross entropy, (B, 81). Stablemax (the paper's choice) replaces exp with a function
    that grows linearly for x >= 0 and as 1/(1-x) below, which avoids the softmax collapse that
    plain softmax hits late in small-data training. Computed in float64 as the reference does
    (the logits are tiny: B x 81 x 11); mps has no float64, so it uses float32 there."""
    if kind == 'softmax':
        return F.cross_entropy(logits.float().transpose(1, 2), labels.long(), reduction='none')
    wide = torch.float32 if logits.device.type == 'mps' else torch.float64
    x = logits.to(wide)
    s = torch.where(x < 0, 1 / (1 - x), x + 1)
    log_probs = torch.log(s / s.sum(-1, keepdim=True))
    return -log_probs.gather(-1, labels.long()[..., None]).squeeze(-1).float()


# -----------------------------------------------------------------------------
# FLOP count, for MFU

def flops_per_step(config, batch_size, training=True):
    """Analytic matmul FLOPs (2 per multiply-add) of one ACT training step (training=True) or one
    inference segment. A block costs 2*params_per_token for its linears plus 4*S*D for QK^T and PV
    (full S x S even with the Sudoku mask: the kernel does not skip masked tiles).
    Per segment: H_cycles*L_cycles L-module and H_cycles H-module passes forward; backward (2x forward)
    only through the last L and H pass ('1step'), or through all of them ('full'); plus one more full
    forward for the Q-continue target when enabled."""
    D, S = config.hidden_size, config.seq_len + 1
    inter = 256 * math.ceil(round(config.expansion * D * 2 / 3) / 256)
    block = 2 * (4 * D * D + 3 * D * inter) + 4 * S * D                      # per token
    L_pass, H_pass = config.L_layers * block, config.H_layers * block
    forward = config.H_cycles * (config.L_cycles * L_pass + H_pass) + 2 * D * config.vocab_size
    if not training:
        return forward * S * batch_size
    backward = 2 * (forward if config.grad_mode == 'full' else L_pass + H_pass + 2 * D * config.vocab_size)
    q_target = forward if (config.act == 'q' and config.q_target and config.halt_max_steps > 1) else 0
    return (forward + backward + q_target) * S * batch_size
