"""
The attention kernels compiled ahead of time for real NVIDIA GPUs, on a machine without one.

For every config in config/ that runs the Triton kernel on a GPU, the model's own attention (model.Attention,
forward and backward, in the config's GPU dtype) is run on CPU with the kernel launches recorded instead of
executed, so each kernel gets exactly the arguments and launch settings model.py gives it. Each launch is then
compiled by Triton for sm_80, sm_86, sm_89 and sm_90 and its PTX is put through the wheel's ptxas -v. The test
fails when a kernel needs more shared memory than the arch allows one block or spills a register.
    python -m pytest -q -s tests/test_kernel_aot.py   # -s prints the table
    python tests/test_kernel_aot.py                   # the same table in markdown, as in docs/benchmarks.md
    python tests/test_kernel_aot.py --all-head-dims   # every head_dim 16..128, both masks, instead of config/
Compiling needs the real Triton compiler, not the interpreter the other tests run under, so the work runs in
a child process started without TRITON_INTERPRET.
"""
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# compute capability -> shared memory one block may opt in to, in bytes (CUDA programming guide, "Technical
# Specifications per Compute Capability": 163 KiB on sm_80, 99 KiB on sm_86 and sm_89, 227 KiB on sm_90)
ARCHS = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# the dtype train.py runs a config in on CUDA
GPU_DTYPES = {'auto': 'bfloat16', 'bfloat16': 'bfloat16', 'float16': 'float16', 'float32': 'float32'}


def config_stack(path):
    """The config files a run of `path` applies, in order: the ones its usage comment passes to train.py
    (e.g. `python train.py config/sudoku_cpu.py config/diabolical_cpu.py`), else the file alone."""
    usage = re.search(r'train\.py((?:\s+config/[\w.-]+\.py)+)', open(path).read())
    stack = usage.group(1).split() if usage else []
    name = os.path.relpath(path, ROOT)
    return stack if name in stack else [name]


def model_settings(stack):
    """HRMConfig fields and the GPU dtype after applying the config files in order over the defaults, the way
    configurator.py execs them (train.py's other keys are ignored)."""
    from dataclasses import asdict, fields
    from model import HRMConfig
    settings = dict(asdict(HRMConfig()), dtype='auto')
    for name in stack:
        scope = {}
        exec(compile(open(os.path.join(ROOT, name)).read(), name, 'exec'), scope)
        settings.update((k, v) for k, v in scope.items() if k in settings)
    dtype = GPU_DTYPES[settings.pop('dtype')]
    return HRMConfig(**{f.name: settings[f.name] for f in fields(HRMConfig)}), dtype


def record_launches(hrm):
    """Run one attention layer of the model forward and backward on CPU with every Triton launch recorded
    instead of run: returns [(kernel, bound arguments, {num_warps, num_stages})]. The batch is 2: no argument
    of the kernels depends on it (it only sizes the grid; offsets are int64 inside the kernels)."""
    import torch
    import triton
    import model
    config, dtype = hrm.config, hrm.forward_dtype
    launches = []

    def record(kernel, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ('num_warps', 'num_stages')}
        launches.append((kernel, kernel.signature.bind(*args, **kwargs).arguments, options))

    real_run, real_check = triton.runtime.jit.JITFunction.run, model._check_can_launch
    triton.runtime.jit.JITFunction.run = record
    model._check_can_launch = lambda q: None  # CPU tensors stand in for CUDA ones; nothing is launched
    try:
        x = torch.randn(2, config.seq_len + hrm.puzzle_emb_len, config.hidden_size, dtype=dtype, requires_grad=True)
        y = hrm.L_level.layers[0].attn(x, hrm.rope_cos, hrm.rope_sin, hrm.attn_mask, True)
        y.backward(torch.randn_like(y))
    finally:
        triton.runtime.jit.JITFunction.run, model._check_can_launch = real_run, real_check
    return launches


def specialize(kernel, arguments):
    """The signature, constants and attributes Triton's JIT would compile this launch with on a GPU: the same
    types, tt.divisibility=16 on 16-byte-aligned pointers and 16-divisible ints, and ints equal to 1 made
    constant (what JITFunction.run gets from native_specialize_impl; it needs no GPU)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        value = arguments[param.name]
        kind, spec = ('constexpr', value) if param.is_constexpr else native_specialize_impl(CUDABackend, value, False, True, True)
        signature[param.name] = kind
        if kind == 'constexpr':
            constexprs[param.name] = spec
        elif isinstance(spec, str):
            attrs[(i,)] = CUDABackend.parse_attr(spec)
    return signature, constexprs, attrs


def compile_for(job):
    """Compile one specialized kernel for one arch and read its resources from ptxas -v: one row of the table."""
    import triton
    import model
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    name, signature, constexprs, attrs, options, capability = job
    source = triton.compiler.ASTSource(fn=getattr(model, name), signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget('cuda', capability, 32), options=options)
    ptx = compiled.asm['ptx']
    gpu_name = re.search(r'^\.target\s+(\w+)', ptx, re.M).group(1)  # sm_90a for sm_90, as Triton targets it
    ptxas = get_ptxas(capability).path  # the wheel's ptxas that Triton itself assembles this arch with
    with tempfile.NamedTemporaryFile('w', suffix='.ptx') as f:
        f.write(ptx)
        f.flush()
        log = subprocess.run([ptxas, '-v', f'--gpu-name={gpu_name}', f.name, '-o', os.devnull],
                             capture_output=True, text=True, check=True).stderr
    spills = re.search(r'(\d+) bytes spill stores, (\d+) bytes spill loads', log)
    static_shared = re.search(r'(\d+) bytes smem', log)  # Triton's shared memory is dynamic; this is usually absent
    return dict(
        arch=f'sm_{capability}', kernel=name, gpu_name=gpu_name, ptxas=ptxas,
        blocks='x'.join(str(constexprs[k]) for k in ('BLOCK_M', 'BLOCK_N') if k in constexprs), **options,
        shared=compiled.metadata.shared + (int(static_shared.group(1)) if static_shared else 0),
        shared_limit=ARCHS[capability], registers=int(re.search(r'Used (\d+) registers', log).group(1)),
        spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
    )


def shipped_configs():
    """(label, HRMConfig, GPU dtype name) for every config in config/, as train.py would run it on a GPU."""
    for path in sorted(glob.glob(os.path.join(ROOT, 'config', '*.py'))):
        stack = config_stack(path)
        yield (' + '.join(os.path.basename(name)[:-3] for name in stack), *model_settings(stack))


def head_dim_sweep():
    """Every head_dim the model routes to Triton on a GPU, with and without the Sudoku mask, in bf16: not shipped,
    compiled on request (--all-head-dims) to check what triton_attention_problem allows."""
    from model import HRMConfig
    for head_dim in (16, 32, 64, 128):
        for mask in ('none', 'sudoku'):
            yield 'sweep', HRMConfig(hidden_size=2 * head_dim, num_heads=2, H_layers=1, L_layers=1, attn_mask=mask), 'bfloat16'


def compile_all(configs):
    """Every distinct kernel launch of the configs, compiled for every arch: (rows, configs left to SDPA)."""
    import multiprocessing
    from dataclasses import replace
    import torch
    from model import HRM
    variants, skipped, recorded = {}, [], {}  # compile jobs of a config's launches -> the configs that make them
    for label, config, dtype_name in configs:
        head_dim = config.hidden_size // config.num_heads
        # one layer per module: the attention layer's launches do not depend on the depth
        shallow = replace(config, H_layers=1, L_layers=1)
        key = repr((shallow, dtype_name))
        if key not in recorded:
            hrm = HRM(shallow, dtype=getattr(torch, dtype_name))
            recorded[key] = record_launches(hrm) if hrm.uses_triton(torch.device('cuda')) else None
        if recorded[key] is None:
            skipped.append(f"{label} (head_dim {head_dim}, {dtype_name}: SDPA on a GPU)")
            continue
        jobs = tuple((kernel.__name__, *specialize(kernel, arguments), options)
                     for kernel, arguments, options in recorded[key])
        mask = 'sudoku' if config.attn_mask == 'sudoku' else 'no'
        variants.setdefault(repr(jobs), (jobs, []))[1].append(f"{label} (head_dim {head_dim}, {mask} mask, {dtype_name})")
    jobs = [(job, labels, capability) for launches, labels in variants.values() for job in launches for capability in ARCHS]
    # one compile per core; forked workers inherit the imported model, so nothing is imported twice
    with multiprocessing.get_context('fork').Pool(os.cpu_count()) as pool:
        rows = pool.map(compile_for, [(*job, capability) for job, _, capability in jobs])
    return [dict(row, configs=labels) for row, (_, labels, _) in zip(rows, jobs)], skipped


def markdown_table(rows):
    lines = ['| arch | kernel | configs | BLOCK_M x BLOCK_N, warps, stages | shared memory (limit) | registers | spill stores / loads |',
             '| --- | --- | --- | --- | --- | --- | --- |']
    for r in rows:
        lines.append(f"| {r['arch']} | `{r['kernel']}` | {'; '.join(r['configs'])} | {r['blocks']}, {r['num_warps']}, "
                     f"{r['num_stages']} | {r['shared']} B ({r['shared_limit']} B) | {r['registers']} | "
                     f"{r['spill_stores']} / {r['spill_loads']} B |")
    return '\n'.join(lines)


@pytest.fixture(scope='module')
def compiled():
    """Compile once per session, in a child process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, os.path.abspath(__file__), '--json'], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rows, skipped = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\n{markdown_table(rows)}\nskipped: {', '.join(skipped) or 'none'}\n"
          f"{len(rows)} compiles in {time.perf_counter() - t0:.1f} s")
    return rows, skipped


def test_every_shipped_kernel_compiles(compiled):
    rows, skipped = compiled
    kernels = {r['kernel'] for r in rows}
    assert kernels == {'_attention_fwd_kernel', '_attention_bwd_dkdv_kernel', '_attention_bwd_dq_kernel'}, kernels
    # the paper's GPU configs and the CPU configs (run on a GPU) both reach the kernels
    configs = {c for r in rows for c in r['configs']}
    for name in ('sudoku_1gpu', 'sudoku_8gpu', 'sudoku_cpu', 'sudoku_cpu + diabolical_cpu'):
        assert any(c.startswith(name + ' (') for c in configs), (name, configs)
    assert {r['arch'] for r in rows} == {f'sm_{c}' for c in ARCHS}


def test_shared_memory_fits_every_arch(compiled):
    rows, _ = compiled
    over = [r for r in rows if r['shared'] > r['shared_limit']]
    assert not over, "\n".join(f"{r['arch']} {r['kernel']} {r['configs']}: {r['shared']} B > {r['shared_limit']} B"
                               for r in over)


def test_no_register_spills(compiled):
    rows, _ = compiled
    spilling = [r for r in rows if r['spill_stores'] or r['spill_loads']]
    assert not spilling, "\n".join(f"{r['arch']} {r['kernel']} {r['configs']}: spills {r['spill_stores']} B stored, "
                                   f"{r['spill_loads']} B loaded ({r['registers']} registers)" for r in spilling)


if __name__ == '__main__':
    os.environ.pop('TRITON_INTERPRET', None)  # before triton is imported: compile for real, do not interpret
    sys.path.insert(0, ROOT)
    rows, skipped = compile_all(head_dim_sweep() if '--all-head-dims' in sys.argv else shipped_configs())
    if '--json' in sys.argv:
        print(json.dumps([rows, skipped]))
    else:
        print(markdown_table(rows))
        print(f"\nConfigs on SDPA (not compiled): {', '.join(skipped) or 'none'}.")
