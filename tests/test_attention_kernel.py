"""
Tests for the fused attention kernel, run on CPU through the Triton interpreter.
Every result is checked against a float64 PyTorch reference written here, independently of the model code.
Run: python -m pytest -q tests/test_attention_kernel.py
"""
import os

# the interpreter is chosen when triton is imported, so this has to come before torch/triton are imported
os.environ["TRITON_INTERPRET"] = "1"

import math
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from model import HRM, HRMConfig, fused_attention, sudoku_attention_mask  # noqa: E402

# allowed error per element, relative to that element and to the largest reference value (see assert_matches);
# bf16/fp16 inputs are rounded before the reference sees them, so these bound only the kernel's own rounding
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


def reference_attention(q, k, v, mask):
    """float64 attention on (B, S, H, D) inputs, returning (o, logsumexp of the scaled scores as (B, H, S))."""
    q, k, v = q.double(), k.double(), v.double()
    scores = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(q.size(-1))  # (B, H, S, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    o = torch.einsum("bhst,bthd->bshd", scores.softmax(dim=-1), v)
    return o, scores.logsumexp(dim=-1)


def sudoku_mask(prefix_len=1):
    """(81 + P, 81 + P) for P = prefix_len: positions 0..P-1 are the prefix, which sees and is seen by all; the
    cells follow, the grid row-major, each seeing the cells of its row, column and 3x3 box (itself included).
    Built here from the grid geometry and checked against the model's sudoku_attention_mask, which is what the
    reference then uses (the kernels never read a mask: they compute this one from positions)."""
    S = 81 + prefix_len
    mask = torch.zeros(S, S, dtype=torch.bool)
    mask[:prefix_len, :] = True
    mask[:, :prefix_len] = True
    for a in range(81):
        for b in range(81):
            (row_a, col_a), (row_b, col_b) = divmod(a, 9), divmod(b, 9)
            same_box = (row_a // 3, col_a // 3) == (row_b // 3, col_b // 3)
            mask[prefix_len + a, prefix_len + b] = row_a == row_b or col_a == col_b or same_box
    assert (mask[prefix_len:].sum(dim=1) == prefix_len + 20 + 1).all()  # prefix, 20 peers, itself
    model_mask = sudoku_attention_mask(prefix_len)
    assert torch.equal(model_mask, mask)
    return model_mask


def make_mask(kind, S):
    return sudoku_mask(S - 81) if kind == "sudoku" else None


def rebuild_qkv(qkv, like):
    """The model's split of a fused (B, S, 3*H*D) projection into q, k, v views shaped like `like`."""
    B, S, H, D = like.shape
    return qkv.view(B, S, 3, H, D).unbind(2)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every torch.empty float tensor (the op's outputs and scratch) starts as nan, so an element the kernels
    never write survives as nan and fails the comparison instead of passing by holding a lucky zero."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    assert torch.empty(3).isnan().all()


def assert_matches(name, actual, expected, dtype):
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: {(~torch.isfinite(actual)).sum().item()} non-finite elements"
    # the scale is at least 1 (the inputs are unit normal) so exact zeros, like every gradient at seq 1, still
    # allow the rounding residue of p * (dp - delta)
    tol, scale = TOLERANCE[dtype], max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{name}: {m}")


def check_against_reference(q, k, v, mask, leaves, generator):
    """Forward output, logsumexp and the gradients of the given leaves vs float64 autograd through the reference."""
    dtype = q.dtype
    o = fused_attention(q, k, v, mask)
    do = torch.randn(o.shape, generator=generator).to(dtype)
    grads = torch.autograd.grad(o, leaves, do)

    leaves64 = [leaf.detach().double().requires_grad_() for leaf in leaves]
    if len(leaves) == 3:
        q64, k64, v64 = leaves64
    else:  # one fused qkv leaf: rebuild the views the same way from its float64 copy
        q64, k64, v64 = rebuild_qkv(leaves64[0], q)
    o64, lse64 = reference_attention(q64, k64, v64, mask)
    grads64 = torch.autograd.grad(o64, leaves64, do.double())

    assert_matches("o", o, o64.detach(), dtype)
    _, lse = torch.ops.nanohrm.attention_fwd(q.detach(), k.detach(), v.detach(), mask)
    assert_matches("lse", lse, lse64.detach(), torch.float32)
    names = ["dq", "dk", "dv"] if len(leaves) == 3 else ["dqkv"]
    for name, grad, grad64 in zip(names, grads, grads64):
        assert_matches(name, grad, grad64, dtype)


# (batch, heads, seq, head_dim, dtype, mask): every seq length, head_dim, dtype and mask kind, mixed; seq 82 is
# HRM's (81 cells + prefix), 1/81/82/84/97 leave ragged tail blocks, 200 takes several forward key blocks. The
# Sudoku mask comes with 0, 1 or 3 prefix positions (seq 81, 82, 84), so the kernels' position arithmetic is
# checked beyond the model's one prefix.
CASES = [
    (2, 2, 1, 32, torch.float32, "none"),
    (1, 2, 16, 64, torch.float32, "none"),
    (2, 1, 81, 32, torch.float32, "none"),
    (1, 2, 82, 64, torch.float32, "none"),
    (1, 1, 97, 128, torch.float32, "none"),
    (1, 2, 128, 64, torch.float32, "none"),
    (1, 1, 200, 32, torch.float32, "none"),
    (1, 2, 82, 64, torch.float32, "sudoku"),
    (2, 1, 81, 16, torch.float32, "sudoku"),
    (1, 1, 84, 32, torch.float32, "sudoku"),
    (1, 2, 1, 64, torch.bfloat16, "none"),
    (1, 2, 82, 64, torch.bfloat16, "none"),
    (1, 1, 128, 128, torch.bfloat16, "none"),
    (1, 2, 82, 128, torch.bfloat16, "sudoku"),
    (1, 1, 84, 16, torch.bfloat16, "sudoku"),
    (1, 1, 16, 32, torch.float16, "none"),
    (2, 1, 81, 64, torch.float16, "none"),
    (1, 1, 82, 32, torch.float16, "sudoku"),
    (1, 1, 128, 128, torch.float16, "none"),
]


@pytest.mark.parametrize("B,H,S,D,dtype,mask_kind", CASES,
                         ids=[f"B{c[0]}-H{c[1]}-S{c[2]}-D{c[3]}-{str(c[4])[6:]}-{c[5]}" for c in CASES])
def test_matches_float64_reference(B, H, S, D, dtype, mask_kind, poisoned_empty):
    generator = torch.Generator().manual_seed(1000 * S + D)
    q, k, v = (torch.randn(B, S, H, D, generator=generator).to(dtype).requires_grad_() for _ in range(3))
    check_against_reference(q, k, v, make_mask(mask_kind, S), [q, k, v], generator)


@pytest.mark.parametrize("dtype,mask_kind", [(torch.float32, "sudoku"), (torch.bfloat16, "none")])
def test_fused_qkv_views(dtype, mask_kind, poisoned_empty):
    # q, k, v as the model makes them: strided views into one (B, S, 3*H*D) projection, never copied
    B, S, H, D = 2, 82, 2, 32
    generator = torch.Generator().manual_seed(7)
    qkv = torch.randn(B, S, 3 * H * D, generator=generator).to(dtype).requires_grad_()
    q, k, v = rebuild_qkv(qkv, torch.empty(B, S, H, D))
    assert not q.is_contiguous() and q.stride() == (S * 3 * H * D, 3 * H * D, D, 1)
    check_against_reference(q, k, v, make_mask(mask_kind, S), [qkv], generator)


def test_mixed_layouts(poisoned_empty):
    # q, k, v, do each with its own strides, so a kernel that reads one tensor with another's strides fails:
    # q head-major (B, H, S, D) transposed, k contiguous, v a slice of a wider tensor, do with head_dim strided
    B, S, H, D = 1, 97, 2, 64
    generator = torch.Generator().manual_seed(11)
    q_leaf = torch.randn(B, H, S, D, generator=generator).requires_grad_()
    k_leaf = torch.randn(B, S, H, D, generator=generator).requires_grad_()
    v_leaf = torch.randn(B, S, H, 2 * D, generator=generator).requires_grad_()
    leaves = [q_leaf, k_leaf, v_leaf]

    def views(q_leaf, k_leaf, v_leaf):
        return q_leaf.transpose(1, 2), k_leaf, v_leaf[..., :D]

    o = fused_attention(*views(*leaves))
    do = torch.randn(B, S, D, H, generator=generator).transpose(2, 3)
    assert do.stride(-1) != 1
    grads = torch.autograd.grad(o, leaves, do)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    o64, _ = reference_attention(*views(*leaves64), None)
    grads64 = torch.autograd.grad(o64, leaves64, do.double())
    assert_matches("o", o, o64.detach(), torch.float32)
    for name, grad, grad64 in zip(["dq", "dk", "dv"], grads, grads64):
        assert_matches(name, grad, grad64, torch.float32)


def test_torch_compile_fullgraph():
    # fullgraph=True turns any graph break into an error; aot_eager also traces the backward through the fakes
    B, S, H, D = 1, 82, 2, 32
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, S, H, D, generator=generator).requires_grad_() for _ in range(3))
    mask = sudoku_mask()

    def attention_loss(q, k, v, mask):
        return (fused_attention(q, k, v, mask) * 0.5).square().sum()

    compiled = torch.compile(attention_loss, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v, mask)
    grads = torch.autograd.grad(loss, (q, k, v))
    eager_loss = attention_loss(q, k, v, mask)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v))
    torch.testing.assert_close(loss, eager_loss)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad)


def test_opcheck_custom_ops():
    # schema, fake tensor, autograd registration and aot_autograd (dynamic shapes) checks from torch.library
    B, S, H, D = 1, 82, 1, 16
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, S, H, D, generator=generator).requires_grad_() for _ in range(3))
    mask = sudoku_mask()
    for m in (None, mask):
        torch.library.opcheck(torch.ops.nanohrm.attention_fwd.default, (q, k, v, m))
    o, lse = torch.ops.nanohrm.attention_fwd(q.detach(), k.detach(), v.detach(), mask)
    do = torch.randn(o.shape, generator=generator)
    delta = (o * do).sum(-1).transpose(1, 2)
    torch.library.opcheck(torch.ops.nanohrm.attention_bwd.default,
                          (do, q.detach(), k.detach(), v.detach(), lse, delta, mask))


def test_rejects_masks_it_does_not_compute():
    # the kernels compute the Sudoku mask from positions, so any other mask must fail loudly rather than
    # silently get the Sudoku one (or none): a random mask, an all-True one at S = 82 and at S = 81, and the
    # Sudoku mask itself after an in-place edit (the check is cached per tensor, not blind to changes)
    B, S, H, D = 1, 82, 1, 16
    generator = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(B, S, H, D, generator=generator) for _ in range(3))
    random_mask = torch.rand(S, S, generator=generator) < 0.3
    random_mask[:, 0] = True
    for mask in (random_mask, torch.ones(S, S, dtype=torch.bool)):
        with pytest.raises(ValueError, match="sudoku_attention_mask"):
            fused_attention(q, k, v, mask)
    with pytest.raises(ValueError, match="sudoku_attention_mask"):
        fused_attention(*(t[:, 1:] for t in (q, k, v)), torch.ones(81, 81, dtype=torch.bool))
    mask = sudoku_mask()
    fused_attention(q, k, v, mask)
    mask[5, 60] = True
    with pytest.raises(ValueError, match="sudoku_attention_mask"):
        fused_attention(q, k, v, mask)


def test_backward_keeps_no_qkv_buffer_alive():
    # v reaches the op as a view of the fused (B, S, 3*H*D) projection; what the op saves for the backward must
    # not hold that whole buffer: every saved tensor's storage is at most its own size
    B, S, H, D = 2, 82, 2, 32
    qkv = torch.randn(B, S, 3 * H * D, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.untyped_storage().nbytes(), t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q, k, v = rebuild_qkv(qkv, torch.empty(B, S, H, D))
        o = fused_attention(q, k, v, sudoku_mask())
    assert saved, "nothing saved for the backward"
    assert all(storage <= size for _, storage, size in saved), saved
    torch.autograd.grad(o.sum(), qkv)  # and the backward still runs from what was saved


def routing(hidden_size, num_heads, dtype, device, attn_impl='auto'):
    config = HRMConfig(hidden_size=hidden_size, num_heads=num_heads, H_layers=1, L_layers=1, attn_impl=attn_impl)
    return HRM(config, dtype=dtype).uses_triton(torch.device(device))


def test_uses_triton_routing():
    # 'auto': the kernels on CUDA for bf16/fp16 and head_dim 16..128 a power of two, SDPA for everything else
    # (fp32 on CUDA, odd head dims, CPU); attn_impl='triton' where they cannot run is a one-line error
    assert routing(512, 8, torch.bfloat16, 'cuda')           # the paper model, head_dim 64
    assert routing(64, 2, torch.float16, 'cuda')             # head_dim 32
    assert not routing(512, 8, torch.float32, 'cuda')        # fp32 on CUDA: SDPA
    assert not routing(96, 2, torch.bfloat16, 'cuda')        # head_dim 48
    assert not routing(64, 8, torch.bfloat16, 'cuda')        # head_dim 8
    assert not routing(512, 2, torch.bfloat16, 'cuda')       # head_dim 256
    assert not routing(512, 8, torch.float32, 'cpu')
    assert not routing(512, 8, torch.bfloat16, 'cuda', attn_impl='sdpa')
    assert routing(64, 2, torch.float32, 'cpu', attn_impl='triton')  # under the interpreter, as these tests run
    for args in ((512, 8, torch.float32, 'cuda'), (96, 2, torch.bfloat16, 'cuda'), (64, 8, torch.bfloat16, 'cuda')):
        with pytest.raises(ValueError, match="attn_impl='triton'"):
            routing(*args, attn_impl='triton')
