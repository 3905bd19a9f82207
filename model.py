"""
The Hierarchical Reasoning Model (HRM, Wang et al. 2025, arXiv 2506.21734) for Sudoku, in one file.

Two recurrent transformer modules: a slow high-level module H and a fast low-level module L. One "segment" runs
H_cycles x L_cycles updates of (z_H, z_L); only the last L and H update carry gradient (the 1-step gradient). Segments
repeat up to halt_max_steps times; a Q head on z_H, trained with Q-learning targets, decides when to halt (ACT).
"""

import math
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import prepare_sudoku as sudoku

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # the model then uses PyTorch's attention (SDPA)
    HAS_TRITON = False


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
    grad_mode: str = '1step'      # '1step': only the last L and H update get gradient | 'cycle': the last H cycle
                                  # (TRM) | 'full': the whole segment
    attn_mask: str = 'none'       # 'none': full attention | 'sudoku': each cell sees its row, column and box peers
    loss: str = 'stablemax'       # 'stablemax' (paper) | 'softmax'
    label_smoothing: float = 0.0  # weight of the uniform target over the 9 digits in the loss (paper: 0)
    shared_levels: bool = False   # one network for both levels, as TRM (the paper: separate H and L modules)
    attn_impl: str = 'auto'       # 'auto': Triton kernel on CUDA, SDPA elsewhere | 'triton' | 'sdpa'

    def __post_init__(self):
        choices = dict(act=('q', 'fixed'), grad_mode=('1step', 'cycle', 'full'), attn_mask=('none', 'sudoku'),
                       loss=('stablemax', 'softmax'), attn_impl=('auto', 'triton', 'sdpa'))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.halt_max_steps < 1 or min(self.H_cycles, self.L_cycles, self.H_layers, self.L_layers) < 1:
            raise ValueError("halt_max_steps, H/L_cycles and H/L_layers must all be >= 1")
        if self.shared_levels and self.H_layers != self.L_layers:
            raise ValueError(f"shared_levels needs H_layers == L_layers (got {self.H_layers} and {self.L_layers})")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")


# -----------------------------------------------------------------------------
# building blocks

def trunc_normal_(tensor, std=1.0, lower=-2.0, upper=2.0):
    """HRM's init: a normal truncated at [lower, upper] stds, rescaled to std `std` (truncation alone shrinks ~12%)."""
    with torch.no_grad():
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
    # x: (B, S, H, D), rotated in fp32 as the reference. rotate_half(x) * sin = cat(x2, x1) * cat(-sin1, sin2): the
    # sign goes on the (S, D) table, not a negated copy of x, and the sum accumulates in place (CPU temporaries cost)
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    sin1, sin2 = sin.chunk(2, dim=-1)
    signed_sin = torch.cat((-sin1, sin2), dim=-1)[:, None, :]
    return (x32 * cos[:, None, :]).addcmul_(torch.cat((x2, x1), dim=-1), signed_sin).to(x.dtype)


def sudoku_attention_mask(puzzle_emb_len=1):
    """(S, S) bool, True = query may attend key. Cells see their row, column and box peers (prepare_sudoku.PEERS,
    where the board geometry lives) and themselves; the puzzle-embedding prefix sees and is seen by every position."""
    S = 81 + puzzle_emb_len
    mask = torch.ones(S, S, dtype=torch.bool)
    cells = torch.eye(81, dtype=torch.bool)
    for cell, peers in enumerate(sudoku.PEERS):
        cells[cell, list(peers)] = True
    mask[puzzle_emb_len:, puzzle_emb_len:] = cells
    return mask


# -----------------------------------------------------------------------------
# attention. Layout everywhere is (B, S, H, D), as flash_attn_func, non-causal, softmax scale 1/sqrt(D), optional
# boolean (S, S) mask shared by all batches and heads (True = may attend). The Triton kernels are at the end.

def attention_reference(q, k, v, mask=None):
    """The math the kernel fuses, in plain PyTorch."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, H, S, S)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    # softmax in fp32 like the kernel, so bf16 logits do not lose the small probabilities
    att = torch.softmax(att.float(), dim=-1).to(v.dtype)
    return (att @ v).transpose(1, 2)  # (B, S, H, D)


def sdpa_attention(q, k, v, mask=None):
    """The model's fallback when the kernel cannot run: PyTorch's SDPA, which wants (B, H, S, D)."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return y.transpose(1, 2)  # (B, S, H, D)


class Attention(nn.Module):
    """Non-causal multi-head self-attention with RoPE; HRM.uses_triton picks fused_attention or sdpa_attention."""

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


def swiglu_width(config):
    # 2/3 keeps the parameter count of a 4x MLP; rounding up to 256 keeps matmuls tile-friendly
    return 256 * math.ceil(round(config.expansion * config.hidden_size * 2 / 3) / 256)


class SwiGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        inter = swiglu_width(config)
        self.gate_up_proj = CastedLinear(config.hidden_size, 2 * inter)
        self.down_proj = CastedLinear(inter, config.hidden_size)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)      # 2 x (B, S, inter), views of one buffer
        if torch.is_grad_enabled():
            return self.down_proj(F.silu(gate) * up)
        # Without autograd nothing reads gate again, so silu and the product overwrite it: two fewer
        # (B, S, inter) temporaries in the no-grad updates, which are most of a segment's work
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))


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
    inputs: torch.Tensor   # (B, 81) cells of the current puzzle, 0 = blank
    labels: torch.Tensor   # (B, 81) its solution's digits


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
        self.L_level = self.H_level if config.shared_levels else ReasoningModule(config, config.L_layers)
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
        """Whether attention on `device` uses the Triton kernels, else SDPA; attn_impl='triton' raises if they can't."""
        impl = self.config.attn_impl
        if impl == 'sdpa' or (impl == 'auto' and device.type != 'cuda'):
            return False
        problem = triton_attention_problem(self.config.hidden_size // self.config.num_heads, self.forward_dtype, device)
        if impl == 'triton' and problem is not None:
            raise ValueError(f"attn_impl='triton': {problem}")
        return problem is None

    def embed(self, cells):
        tokens = F.embedding(cells.long() + 1, self.embed_tokens)                  # (B, 81, D): cell c is token c+1
        prefix = self.puzzle_emb.expand(cells.shape[0], -1)[:, None, :]            # (B, 1, D)
        return (self.embed_scale * torch.cat((prefix, tokens), dim=1)).to(self.forward_dtype)  # (B, S, D)

    def segment(self, z_H, z_L, inputs):
        cfg = self.config
        x = self.embed(inputs)
        ctx = (self.rope_cos, self.rope_sin, self.attn_mask, self.uses_triton(x.device))
        # The 1-step gradient: every update but the last L and the last H one runs without grad, so
        # memory and backward cost do not grow with the number of cycles (the paper's O(1) memory).
        # 'cycle' (TRM's) backprops the whole last H cycle, 'full' the whole segment.
        grad = torch.is_grad_enabled()
        for h in range(cfg.H_cycles):
            last = h == cfg.H_cycles - 1
            with torch.set_grad_enabled(grad and (cfg.grad_mode == 'full' or (cfg.grad_mode == 'cycle' and last))):
                for l in range(cfg.L_cycles - last):
                    z_L = self.L_level(z_L, z_H + x, *ctx)
                if not last:
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
        """One ACT training step: rows that halted last step restart from the initial states on the new puzzle (inputs:
        (B, 81) cells, 0 = blank; labels: its solution's digits), then every row runs one segment. min_halt_steps (B,):
        the exploration draw; train.py passes its rank's slice of one global draw so DDP matches a single process."""
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
        if cfg.act == 'q':  # outside no_grad: the Q head trains through these
            q_halt, q_continue = q_logits.unbind(-1)
            outputs['q_halt_logits'], outputs['q_continue_logits'] = q_halt, q_continue
        with torch.no_grad():
            steps = steps + 1
            halted = is_last = steps >= cfg.halt_max_steps
            if cfg.act == 'q':
                # At eval every row runs halt_max_steps segments so a batch halts together.
                if self.training and cfg.halt_max_steps > 1:
                    halted = halted | (q_halt > q_continue)
                    if min_halt_steps is None:
                        min_halt_steps = self.exploration_draw(steps.shape[0], steps.device)
                    halted = halted & (steps >= min_halt_steps)
                    if cfg.q_target:
                        # Bootstrapped target for Q-continue: the value of the next segment, from a second forward
                        # with the current weights (no replay buffer, no target net: the batch is the environments).
                        next_halt, next_continue = self.segment(z_H, z_L, inputs)[3].unbind(-1)
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
        """Summed over the batch (the caller divides by the global batch size). Metrics are device tensors of sums
        over the rows that halted this step, so reading them needs no sync here."""
        logits, labels = outputs['logits'], carry.labels.long() + 1  # digits 1..9 are tokens 2..10
        # each puzzle averaged over its 81 cells
        lm_loss = cross_entropy(logits, labels, self.config.loss, self.config.label_smoothing).mean(-1).sum()
        with torch.no_grad():
            cell_correct = logits.argmax(-1) == labels                            # (B, 81)
            exact = cell_correct.all(-1)                                          # (B,)
            done = carry.halted
            metrics = dict(count=done.sum(), cell_acc=(cell_correct.float().mean(-1) * done).sum(),
                           exact_acc=(exact & done).sum(), steps=(carry.steps * done).sum(), lm_loss=lm_loss.detach())
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
    def solve(self, puzzles, segments=None, halt=False, views=1, check=False, restart=0, hints=0, trace=False,
              generator=None):
        """Batch inference on (B, 81) puzzles, cells 0..9 (0 = blank): `segments` (= halt_max_steps) segments of each,
        as the paper evaluates. Test-time compute: views=K solves K random symmetries of each puzzle (the first is the
        puzzle itself) as one batch; check=True stops a puzzle once a view's answer is a valid grid keeping the givens
        (exact for unique-solution puzzles); halt=True stops a view where the Q head says halt; restart=T starts a view
        over as a fresh random symmetry every T segments while its answer does not check (same compute, more views: the
        views that solve mostly do so within a few segments), and with hints=h the new view keeps the h cells the model
        was surest of in the old view's answer as extra givens (so a view's puzzle gains h givens a restart: a search
        the model guides; the answer must still check against the puzzle's own givens). A puzzle's answer is its
        first checking view's, else a per-cell vote over its views' last answers (ties to the first view)."""
        segments = segments or self.config.halt_max_steps
        B, K, device = puzzles.shape[0], views, puzzles.device
        N = B * K  # rows are puzzle-major: row b*K + k is view k of puzzle b
        # one view draws nothing, so the paper's eval leaves every random stream alone
        symmetry = sudoku.random_symmetry(N, generator, device) if K > 1 else sudoku.identity_symmetry(N, device)
        for part, first in zip(symmetry, sudoku.identity_symmetry(B, device)):  # view 0: the puzzle itself
            part.view(B, K, -1)[:, 0] = first
        grids = sudoku.apply_symmetry(puzzles.long().repeat_interleave(K, dim=0), symmetry)  # (N, 81)
        cells = grids  # the puzzles of the rows still running
        z_H = self.H_init.to(self.forward_dtype).expand(N, self.config.seq_len + self.puzzle_emb_len, -1)
        z_L = self.L_init.to(self.forward_dtype).expand_as(z_H)
        preds = torch.ones_like(grids)
        steps = torch.zeros(N, dtype=torch.int32, device=device)
        q_halt = torch.full((N,), float('nan'), device=device) if self.config.act == 'q' else None
        rows = torch.arange(N, device=device)  # the view each row of the running batch belongs to
        history = []
        for i in range(segments):
            z_H, z_L, logits, q_logits = self.segment(z_H, z_L, cells)
            answer = logits[..., 2:].argmax(-1) + 1                                  # (n, 81) digits 1..9
            preds[rows], steps[rows] = answer, steps[rows] + 1
            if q_logits is not None:
                q_halt[rows] = q_logits[:, 0]
            if trace:  # mapped back now: a restart changes the row's symmetry
                history.append(sudoku.invert_symmetry(preds, symmetry))
            stop = None
            if check or restart:
                valid, consistent = sudoku.check_grids(grids[rows], answer)
                ok = valid & consistent
            if check:
                # summed, not index_put: several views of one puzzle share its index, and writes to one index race
                solved = torch.zeros(B, dtype=torch.int32, device=device).index_add_(0, rows // K, ok.int()) > 0
                stop = solved[rows // K]  # every view of a solved puzzle stops
            if halt and q_logits is not None:
                wants_halt = q_logits[:, 0] > q_logits[:, 1]
                stop = wants_halt if stop is None else stop | wants_halt
            if restart and i < segments - 1:
                fresh = (steps[rows] % restart == 0) & ~ok
                if stop is not None:
                    fresh &= ~stop
                if fresh.any():  # these rows go on, each on a new view from the initial states
                    again = rows[fresh]
                    old = tuple(part[again] for part in symmetry)
                    given = sudoku.invert_symmetry(grids[again], old)  # the puzzle's own cells, with the hints so far
                    if hints:  # and the old view's h surest answer cells
                        sure = logits[fresh][..., 2:].float().softmax(-1).amax(-1)       # view cell i is
                        sure = torch.zeros_like(sure).scatter_(1, old[0], sure)           # puzzle cell index[i]
                        top = sure.masked_fill(given > 0, -1).topk(min(hints, 81), dim=1).indices
                        guess = sudoku.invert_symmetry(answer[fresh], old)
                        given = torch.where(given > 0, given, given.scatter(1, top, guess.gather(1, top)))
                    new = sudoku.random_symmetry(len(again), generator, device)
                    for part, p in zip(symmetry, new):
                        part[again] = p
                    grids[again] = sudoku.apply_symmetry(given, new)
                    cells = torch.where(fresh[:, None], grids[rows], cells)
                    z_H = torch.where(fresh[:, None, None], self.H_init.to(z_H.dtype), z_H)
                    z_L = torch.where(fresh[:, None, None], self.L_init.to(z_L.dtype), z_L)
            if stop is not None and stop.any():  # a host sync, only on these opt-in paths
                z_H, z_L, cells, rows = (t[~stop] for t in (z_H, z_L, cells, rows))
                if len(rows) == 0:
                    break
        answers = sudoku.invert_symmetry(preds, symmetry).view(B, K, 81)
        valid, consistent = sudoku.check_grids(grids, preds)
        checks = (valid & consistent).view(B, K)
        first_checked = checks.int().argmax(1)                                     # (B,) lowest view that checks
        # (B, 81, 9) votes per digit, two a view and one more for the first, so ties go to it (one view: its answer)
        vote = (F.one_hot(answers - 1, 9).sum(1) * 2 + F.one_hot(answers[:, 0] - 1, 9)).argmax(-1) + 1
        any_checked = checks.any(1)
        final = torch.where(any_checked[:, None], answers[torch.arange(B, device=device), first_checked], vote)
        view = torch.where(any_checked | (K == 1), first_checked, -1)
        chosen = torch.arange(B, device=device) * K + view.clamp(min=0)
        valid, consistent = sudoku.check_grids(puzzles, final)  # a vote can check too
        return Solution(
            grids=final, steps=steps.view(B, K).amax(1), checked=valid & consistent,
            view=view, q_halt=None if q_halt is None else q_halt[chosen],
            history=torch.stack(history).view(-1, B, K, 81) if trace else None)


class Solution(NamedTuple):
    """What HRM.solve returns, per puzzle."""
    grids: torch.Tensor              # (B, 81) the answer, digits 1..9 in the puzzle's own cell order
    steps: torch.Tensor              # (B,) segments run (the longest of its views)
    checked: torch.Tensor            # (B,) bool: the answer is a valid grid that keeps the givens
    view: torch.Tensor               # (B,) the view the answer came from; -1 = the per-cell vote
    q_halt: Optional[torch.Tensor]   # (B,) the last q_halt logit of that view (None without a Q head)
    history: Optional[torch.Tensor]  # (T, B, K, 81) every view's answer after each segment (trace=True)


def load_checkpoint(path, device, dtype=None):
    """(HRM, the run's config dict) from train.py's ckpt.pt: the run's architecture and EMA weights if kept, in eval
    mode on `device`, in the run's dtype unless `dtype` is given. A missing or unreadable file raises ValueError."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    device = torch.device(device)
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=False, mmap=True)
        run_config = checkpoint['config']
        # a key newer than the run keeps its default, which is what that run used
        model_config = HRMConfig(**{k: run_config[k] for k in HRMConfig.__dataclass_fields__ if k in run_config})
        if dtype is None:
            name = run_config.get('dtype', 'auto')
            name = name if name != 'auto' else 'bfloat16' if device.type == 'cuda' else 'float32'
            dtype = getattr(torch, name)
        model = HRM(model_config, dtype=dtype)
        model.load_state_dict(checkpoint['model'])
        if checkpoint.get('ema') is not None:
            with torch.no_grad():
                for p, e in zip(model.parameters(), checkpoint['ema']):
                    p.copy_(e)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    return model.to(device).eval(), run_config


def cross_entropy(logits, labels, kind, smoothing=0.0):
    """Per-cell cross entropy, (B, 81), against the label mixed with weight `smoothing` of a uniform target over the 9
    digit tokens. Stablemax (the paper's) replaces exp with x + 1 for x >= 0 and 1/(1-x) below, avoiding the softmax
    collapse late in small-data training. In float64 as the reference (tiny logits); mps has none, so float32 there."""
    if kind == 'softmax':
        log_probs = F.log_softmax(logits.float(), -1)
    else:
        x = logits.to(torch.float32 if logits.device.type == 'mps' else torch.float64)
        # clamp: the branch where() discards must stay finite, or its infinite gradient at x = 1 (common in
        # bf16) times where()'s zero makes NaN
        s = torch.where(x < 0, 1 / (1 - x.clamp(max=0)), x + 1)
        log_probs = torch.log(s / s.sum(-1, keepdim=True))
    nll = -log_probs.gather(-1, labels.long()[..., None]).squeeze(-1)
    if smoothing:
        nll = (1 - smoothing) * nll - smoothing * log_probs[..., 2:].mean(-1)
    return nll.float()


# -----------------------------------------------------------------------------
# FLOP count, for MFU

def flops_per_step(config, batch_size, training=True):
    """Analytic matmul FLOPs (2 per multiply-add) of one ACT training step (training=True) or one inference segment.
    Attention counts the full S x S even with the Sudoku mask: the kernel does not skip masked tiles."""
    D, S = config.hidden_size, config.seq_len + 1
    block = 2 * (4 * D * D + 3 * D * swiglu_width(config)) + 4 * S * D                      # per token
    L_pass, H_pass = config.L_layers * block, config.H_layers * block
    head = 2 * D * config.vocab_size
    forward = config.H_cycles * (config.L_cycles * L_pass + H_pass) + head
    if not training:
        return forward * S * batch_size
    L_in_graph = config.L_cycles if config.grad_mode == 'cycle' else 1  # L updates the backward goes through
    backward = 2 * (forward if config.grad_mode == 'full' else L_in_graph * L_pass + H_pass + head)
    q_target = forward if (config.act == 'q' and config.q_target and config.halt_max_steps > 1) else 0
    return (forward + backward + q_target) * S * batch_size


# dense bf16 tensor-core peak, TFLOP/s; the first name contained in the device name wins
PEAK_TFLOPS = [('H100 PCIe', 756.0), ('H100 NVL', 835.0), ('H100', 989.0), ('H200', 989.0), ('A100', 312.0)]


def peak_tflops(device_name):
    """Peak dense bf16 TFLOP/s of a GPU by name (torch.cuda.get_device_name()), None if unknown."""
    return next((tflops for key, tflops in PEAK_TFLOPS if key in device_name), None)


# -----------------------------------------------------------------------------
# The Triton fused attention: forward and backward kernels wrapped in a torch custom op, used instead of FlashAttention
# on CUDA (HRM.uses_triton decides). The model only ever uses no mask or the Sudoku one, and the kernels know just
# those: they compute the Sudoku mask from positions instead of loading it.

def triton_attention_problem(head_dim, dtype, device):
    """Why the Triton kernels cannot run attention of this head_dim and dtype on `device`, or None if they can."""
    if not HAS_TRITON:
        return "triton is not installed"
    if head_dim not in (16, 32, 64, 128):
        # tl.dot tiles need power-of-two edges >= 16; up to 128 they compile without spills (test_kernel_aot.py)
        return f"head_dim {head_dim} is not one of 16, 32, 64, 128"
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {dtype} is not bfloat16, float16 or float32"
    if device.type == "cuda" and dtype == torch.float32:
        # fp32 tiles double shared memory and registers: at head_dim 64 the forward outgrew sm_86/89 and all spilled
        return "float32 on CUDA (the kernels are built for bfloat16/float16 there; use attn_impl='sdpa')"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "CPU tensors need TRITON_INTERPRET=1 set before triton is imported (the interpreter, for tests)"
    if device.type not in ("cuda", "cpu"):
        return f"no Triton backend for {device.type}"
    return None


if HAS_TRITON:
    @triton.jit
    def _dot(a, b, DOT_IN_FP32: tl.constexpr):
        # fp32 accumulation always. fp32 inputs only reach the kernels under the interpreter, whose tl.dot multiplies
        # in full fp32. DOT_IN_FP32 is set there for bf16 inputs: the interpreter stores bf16 as raw uint16 and its
        # tl.dot multiplies the bit patterns (triton-lang/triton#11584); upcasting is exact (bf16 products fit fp32).
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b)

    @triton.jit
    def _program(S, BLOCK: tl.constexpr):
        # this program's (batch, head) and block of rows. A 1D grid with the block index fastest: one (batch, head)'s
        # programs run side by side and share its k and v (or q and do) in L2, and no axis meets CUDA's 65535 cap.
        n_blocks = tl.cdiv(S, BLOCK)
        pid = tl.program_id(0)
        return pid // n_blocks, (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)

    @triton.jit
    def _head_start(pid_bh, H, stride_b, stride_h):
        # offset of one (batch, head) slice; int64, since a fused qkv of a large batch passes 2**31 elements
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        return b * stride_b + h * stride_h

    @triton.jit
    def _load_tile(ptr, rows, stride_s, S, HEAD_DIM: tl.constexpr):
        # (len(rows), HEAD_DIM) rows of one head, head_dim at stride 1; rows past the sequence read as zeros
        offs_d = tl.arange(0, HEAD_DIM)
        return tl.load(ptr + rows[:, None] * stride_s + offs_d[None, :], mask=(rows < S)[:, None], other=0.0)

    @triton.jit
    def _store_tile(ptr, rows, stride_s, S, tile, HEAD_DIM: tl.constexpr):
        offs_d = tl.arange(0, HEAD_DIM)
        tl.store(ptr + rows[:, None] * stride_s + offs_d[None, :], tile.to(ptr.dtype.element_ty),
                 mask=(rows < S)[:, None])

    @triton.jit
    def _allowed(rows, cols, S, prefix_len, SUDOKU_MASK: tl.constexpr):
        # (len(rows), len(cols)) block of which scores count: both positions inside the sequence (the last block's
        # ragged tail is padding) and, with SUDOKU_MASK, what sudoku_attention_mask(prefix_len) allows, computed from
        # positions. Symmetric, so the backward gets the transposed block by swapping rows and cols.
        ok = (rows < S)[:, None] & (cols < S)[None, :]
        if SUDOKU_MASK:
            a = rows - prefix_len  # cell index, row-major over the 9x9 grid; negative for the prefix
            b = cols - prefix_len
            same_row = (a // 9)[:, None] == (b // 9)[None, :]
            same_col = (a % 9)[:, None] == (b % 9)[None, :]
            same_box = ((a // 27) * 3 + (a % 9) // 3)[:, None] == ((b // 27) * 3 + (b % 9) // 3)[None, :]
            ok = ok & (same_row | same_col | same_box | (a < 0)[:, None] | (b < 0)[None, :])
        return ok

    @triton.jit
    def _attention_fwd_kernel(
        Q, K, V, O, LSE,
        stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
        H, S, prefix_len, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        SUDOKU_MASK: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ):
        pid_bh, rows = _program(S, BLOCK_M)
        Q += _head_start(pid_bh, H, stride_qb, stride_qh)
        K += _head_start(pid_bh, H, stride_kb, stride_kh)
        V += _head_start(pid_bh, H, stride_vb, stride_vh)
        O += _head_start(pid_bh, H, stride_ob, stride_oh)
        LSE += pid_bh.to(tl.int64) * S
        q = _load_tile(Q, rows, stride_qs, S, HEAD_DIM)

        # online softmax in the exp2 domain (qk_scale carries log2(e)); m_i is the running row max,
        # l_i the running sum of exp2(score - m_i), acc the unnormalized output
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start_n in range(0, S, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            k = _load_tile(K, cols, stride_ks, S, HEAD_DIM)
            v = _load_tile(V, cols, stride_vs, S, HEAD_DIM)
            qk = _dot(q, tl.trans(k), DOT_IN_FP32) * qk_scale  # (BLOCK_M, BLOCK_N)
            qk = tl.where(_allowed(rows, cols, S, prefix_len, SUDOKU_MASK), qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # a row that has no allowed key yet keeps m = -inf; shift it by 0 so exp2 gives 0 instead of nan
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(qk - m_shift[:, None])
            alpha = tl.exp2(m_i - m_shift)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_IN_FP32)
            m_i = m_new

        # l_i == 0 only for padding rows (every real row allows at least itself): output 0 and lse = +inf, which
        # makes every probability the backward recomputes exp(-inf) = 0 for them instead of nan
        has_key = l_i > 0
        l_safe = tl.where(has_key, l_i, 1.0)
        lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("inf"))  # natural log
        _store_tile(O, rows, stride_os, S, acc / l_safe[:, None], HEAD_DIM)
        tl.store(LSE + rows, lse, mask=rows < S)

    @triton.jit
    def _backward_program(Q, K, V, DO, LSE, DELTA, stride_b, stride_h, stride_dob, stride_doh, H, S,
                          BLOCK: tl.constexpr):
        # the set-up both backward kernels share; q, k, v and the gradients have one contiguous layout, offset `head`
        pid_bh, block = _program(S, BLOCK)
        head = _head_start(pid_bh, H, stride_b, stride_h)
        DO += _head_start(pid_bh, H, stride_dob, stride_doh)
        row_stats = pid_bh.to(tl.int64) * S
        return block, head, Q + head, K + head, V + head, DO, LSE + row_stats, DELTA + row_stats

    @triton.jit
    def _attention_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV,
        stride_b, stride_s, stride_h, stride_dob, stride_dos, stride_doh,
        H, S, prefix_len, qk_scale, sm_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        SUDOKU_MASK: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ):
        # one program owns a block of keys and loops over all queries, so dK and dV are written once, no atomics;
        # everything is computed transposed, (keys, queries), so the products land in (BLOCK_N, HEAD_DIM)
        cols, head, Q, K, V, DO, LSE, DELTA = _backward_program(
            Q, K, V, DO, LSE, DELTA, stride_b, stride_h, stride_dob, stride_doh, H, S, BLOCK_N)
        k = _load_tile(K, cols, stride_s, S, HEAD_DIM)
        v = _load_tile(V, cols, stride_s, S, HEAD_DIM)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        for start_m in range(0, S, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            q = _load_tile(Q, rows, stride_s, S, HEAD_DIM)
            do = _load_tile(DO, rows, stride_dos, S, HEAD_DIM)
            lse2 = tl.load(LSE + rows, mask=rows < S, other=0.0) * 1.4426950408889634  # to the exp2 domain
            delta = tl.load(DELTA + rows, mask=rows < S, other=0.0)
            qkT = _dot(k, tl.trans(q), DOT_IN_FP32) * qk_scale  # (BLOCK_N, BLOCK_M)
            # recompute the probabilities from the saved logsumexp; -inf first so masked scores never overflow
            pT = tl.exp2(tl.where(_allowed(cols, rows, S, prefix_len, SUDOKU_MASK), qkT, float("-inf")) - lse2[None, :])
            dv += _dot(pT.to(do.dtype), do, DOT_IN_FP32)
            dpT = _dot(v, tl.trans(do), DOT_IN_FP32)
            dsT = pT * (dpT - delta[None, :])
            dk += _dot(dsT.to(q.dtype), q, DOT_IN_FP32)
        _store_tile(DK + head, cols, stride_s, S, dk * sm_scale, HEAD_DIM)
        _store_tile(DV + head, cols, stride_s, S, dv, HEAD_DIM)

    @triton.jit
    def _attention_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ,
        stride_b, stride_s, stride_h, stride_dob, stride_dos, stride_doh,
        H, S, prefix_len, qk_scale, sm_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        SUDOKU_MASK: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ):
        # one program owns a block of queries and loops over all keys: recomputing P here is cheaper at
        # S ~ 100 than accumulating dQ with atomics from the dK/dV kernel, and is deterministic
        rows, head, Q, K, V, DO, LSE, DELTA = _backward_program(
            Q, K, V, DO, LSE, DELTA, stride_b, stride_h, stride_dob, stride_doh, H, S, BLOCK_M)
        q = _load_tile(Q, rows, stride_s, S, HEAD_DIM)
        do = _load_tile(DO, rows, stride_dos, S, HEAD_DIM)
        lse2 = tl.load(LSE + rows, mask=rows < S, other=0.0) * 1.4426950408889634  # to the exp2 domain
        delta = tl.load(DELTA + rows, mask=rows < S, other=0.0)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start_n in range(0, S, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            k = _load_tile(K, cols, stride_s, S, HEAD_DIM)
            v = _load_tile(V, cols, stride_s, S, HEAD_DIM)
            qk = _dot(q, tl.trans(k), DOT_IN_FP32) * qk_scale  # (BLOCK_M, BLOCK_N)
            p = tl.exp2(tl.where(_allowed(rows, cols, S, prefix_len, SUDOKU_MASK), qk, float("-inf")) - lse2[:, None])
            dp = _dot(do, tl.trans(v), DOT_IN_FP32)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, DOT_IN_FP32)
        _store_tile(DQ + head, rows, stride_s, S, dq * sm_scale, HEAD_DIM)


def _launch_settings(seq_len, head_dim, dtype, backward):
    # A launch's compile-time keyword arguments but SUDOKU_MASK, sized so that tests/test_kernel_aot.py compiles them
    # without spills on sm_80..sm_90: 128 keys per forward step, or 64 queries per backward step, spilled at head_dim
    # 64. A dK/dV program holds k, v, dk, dv and two score tiles for its 64 keys; a dQ program, 32 queries.
    seq_block = max(16, triton.next_power_of_2(seq_len))  # tl.dot needs every tile edge >= 16
    return dict(HEAD_DIM=head_dim, BLOCK_M=min(32 if backward else 64, seq_block), BLOCK_N=min(64, seq_block),
                DOT_IN_FP32=dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
                num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _mask_args(mask, S):
    """(SUDOKU_MASK, prefix_len): (False, 0) for no mask, else (True, P) for the sudoku_attention_mask(P) it must
    equal, checked once per mask tensor and in-place change (on CUDA the comparison waits for the GPU)."""
    if mask is None:
        return False, 0
    prefix_len = S - 81
    version = 0 if mask.is_inference() else mask._version
    if getattr(mask, "_nanohrm_sudoku_version", None) != version:
        if prefix_len < 0 or not torch.equal(mask.cpu(), sudoku_attention_mask(prefix_len)):
            raise ValueError("fused_attention takes no mask or sudoku_attention_mask(); "
                             "use sdpa_attention for other masks")
        mask._nanohrm_sudoku_version = version
    return True, prefix_len


def _check_can_launch(q):
    problem = triton_attention_problem(q.size(-1), q.dtype, q.device)
    if problem is not None:
        raise RuntimeError(f"fused_attention: {problem}")


# A torch.library.custom_op, not triton_op + wrap_triton: an opaque op behaves the same under torch 2.11 and 2.13 and
# the interpreter, torch.compile traces it (register_fake) without graph breaks, and Inductor gains nothing inside a
# kernel that fuses the whole attention. Triton launches on the current device, hence torch.cuda.device_of(q).
@torch.library.custom_op("nanohrm::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns o (B, S, H, D) in q's dtype and the per-row logsumexp of the scaled scores, (B, H, S) fp32."""
    _check_can_launch(q)
    B, S, H, D = q.shape
    sudoku_mask, prefix_len = _mask_args(mask, S)
    # the kernels index head_dim with stride 1 so loads vectorize; any other stride (e.g. an expanded gradient) is
    # copied once. Views of a fused qkv keep stride 1 and pass through uncopied.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    o = torch.empty((B, S, H, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, S), device=q.device, dtype=torch.float32)
    settings = _launch_settings(S, D, q.dtype, backward=False)
    with torch.cuda.device_of(q):
        _attention_fwd_kernel[(B * H * triton.cdiv(S, settings["BLOCK_M"]),)](
            q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            H, S, prefix_len, (1.0 / math.sqrt(D)) * 1.4426950408889634, SUDOKU_MASK=sudoku_mask, **settings)
    return o, lse


@attention_fwd.register_fake
def _(q, k, v, mask):
    return q.new_empty(q.shape), q.new_empty((q.size(0), q.size(2), q.size(1)), dtype=torch.float32)  # o, lse


@torch.library.custom_op("nanohrm::attention_bwd", mutates_args=())
def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
                  delta: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dq, dk, dv like q, given do, lse and delta = rowsum(do * o). Reached via attention_fwd (q checked)."""
    B, S, H, D = q.shape
    sudoku_mask, prefix_len = _mask_args(mask, S)
    # q, k, v (saved contiguous: nothing is copied) share the gradients' layout, so the kernels take it once
    q, k, v, lse, delta = (t.contiguous() for t in (q, k, v, lse, delta))
    do = do if do.stride(-1) == 1 else do.contiguous()  # as q, k, v in attention_fwd
    dq, dk, dv = (torch.empty((B, S, H, D), device=q.device, dtype=q.dtype) for _ in range(3))
    settings = _launch_settings(S, D, q.dtype, backward=True)
    sm_scale = 1.0 / math.sqrt(D)
    scalars = (*q.stride()[:3], *do.stride()[:3], H, S, prefix_len, sm_scale * 1.4426950408889634, sm_scale)
    with torch.cuda.device_of(q):
        _attention_bwd_dkdv_kernel[(B * H * triton.cdiv(S, settings["BLOCK_N"]),)](
            q, k, v, do, lse, delta, dk, dv, *scalars, SUDOKU_MASK=sudoku_mask, **settings)
        _attention_bwd_dq_kernel[(B * H * triton.cdiv(S, settings["BLOCK_M"]),)](
            q, k, v, do, lse, delta, dq, *scalars, SUDOKU_MASK=sudoku_mask, **settings)
    return dq, dk, dv


@attention_bwd.register_fake
def _(do, q, k, v, lse, delta, mask):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _attention_setup_context(ctx, inputs, output):
    (q, k, v, mask), (o, lse) = inputs, output
    # The model hands v over as a view of its fused qkv projection (q and k come fresh out of the rotary). Saving it
    # would keep the whole qkv buffer, 3x the size of v, alive until the backward; a compact copy keeps only v.
    ctx.save_for_backward(q.contiguous(), k.contiguous(), v.contiguous(), o, lse, mask)
    ctx.mark_non_differentiable(lse)  # lse is saved for the backward, not a differentiable result


def _attention_backward(ctx, do, dlse):  # dlse is unused: lse is non-differentiable
    q, k, v, o, lse, mask = ctx.saved_tensors
    # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij, which softmax's backward subtracts from every dP_ij; in fp32, where
    # bf16 products are exact. Outside the op so torch.compile fuses it into one reduction (eager: ~7x the bytes).
    delta = (o.float() * do.float()).sum(-1).transpose(1, 2)  # (B, H, S)
    return (*attention_bwd(do, q, k, v, lse, delta, mask), None)


attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def fused_attention(q, k, v, mask=None):
    """Attention with the Triton kernels: q, k, v (B, S, H, D) of any strides, D one of 16, 32, 64, 128, bf16 or fp16
    (fp32 only under the interpreter); mask: None or sudoku_attention_mask(P) with S = 81 + P. Returns o like q."""
    assert q.dim() == 4 and q.shape == k.shape == v.shape, "q, k, v must share one (B, S, H, D) shape"
    assert q.dtype == k.dtype == v.dtype, "q, k, v must share one dtype"
    assert mask is None or (mask.dtype == torch.bool and mask.shape == (q.size(1),) * 2), "mask must be (S, S) bool"
    return attention_fwd(q, k, v, mask)[0]
