"""
Speed and memory of nanoHRM on this machine (the first CUDA GPU if there is one, else the CPU):
    python bench.py                                    # every section, sizes chosen for the device
    python bench.py --sections=train,inference         # a subset
    python bench.py --json=docs/bench_h100.json        # also write every number and the environment
    python bench.py --quick=True                       # every section at toy sizes in seconds (tests/test_bench.py)
Sections:
    attention  Triton kernel vs SDPA vs the naive reference, forward and forward+backward, at the HRM shape
    optimizer  one AdamATan2 step over the paper model's parameters, foreach=True vs foreach=False
    train      the training step as train.py runs it, paper and CPU config, per attention/compile variant
    memory     peak memory of the training step per micro-batch size (gradient accumulation)
    inference  batch solving at 16 segments, 1 and 8 views, and single-puzzle latency as sample.py sees it
Every timing leaves out the first call and warm-up, synchronizes the GPU (CUDA events) and reports min / median
over repeats; a measurement stops repeating after max_seconds. A row that runs out of memory is reported as OOM
and the run goes on; a row that fails otherwise is reported too, and the exit code is then 1.
"""

import ast
import datetime
import gc
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, fields, replace

import torch

import prepare_sudoku as sudoku
import sample
from configurator import ConfigError, configure
from model import (HRM, HRMConfig, attention_reference, flops_per_step, fused_attention, load_checkpoint, peak_tflops,
                   sdpa_attention, sudoku_attention_mask, triton_attention_problem)
from optim import AdamATan2, SignSGD

# -----------------------------------------------------------------------------
# config; sizes left at 0 are chosen for the device (GPU, CPU) or, with quick=True, toy ones
sections = 'attention,optimizer,train,memory,inference'
device = 'auto'               # 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'
dtype = 'auto'                # 'auto' (bfloat16 on CUDA, float32 on CPU, as train.py), 'bfloat16', 'float32'
json_path = ''                # write every number and the environment here (also spelled --json=PATH)
quick = False                 # toy models, batches and one repeat: every code path in seconds, not a measurement
seed = 0
threads = 0                   # CPU threads for torch and the sample.py subprocess: 0 = torch's default (quick: 1)
repeats = 0                   # timed repeats per measurement: 0 = 20 on GPU, 3 on CPU
max_seconds = 0.0             # stop repeating a measurement after this long: 0 = 3 s on GPU, 30 s on CPU
cpu_config = 'config/sudoku_cpu.py'
attn_batch = 0                # attention section batch: 0 = 768 on GPU, 32 on CPU
train_configs = 'paper,cpu'   # which configs the train and inference sections time
paper_batch = 0               # paper config puzzles per step: 0 = 768 on GPU, 8 on CPU (~15 s a step on 2 cores)
cpu_batch = 0                 # CPU config puzzles per step: 0 = its global_batch_size (32)
cpu_compile = False           # on CPU also time torch.compile + SDPA (compiling takes minutes)
accum_splits = '1,2,4,8,16'   # memory section: gradient accumulation steps (paper config on GPU, CPU config on CPU)
accum_compile = False         # compile the memory section's steps as train.py does on CUDA (a compile per row)
segments = 0                  # inference segments: 0 = 16
infer_batch = 0               # puzzles per solve at views=1 (views=8: 1/8 of them): 0 = 768 on GPU; CPU: 1 paper, 32 cpu
sample_out_dir = ''           # a train.py out_dir holding ckpt.pt; '' = a random-init CPU-model checkpoint
sample_repeats = 0            # `python sample.py` runs timed: 0 = 2
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]

SECTIONS = ('attention', 'optimizer', 'train', 'memory', 'inference')
ROOT = os.path.dirname(os.path.abspath(__file__))
# quick=True shrinks both models to this: every code path of the paper model (Q head, Q target), no real compute
TOY = dict(hidden_size=32, num_heads=2, expansion=2.0, H_layers=1, L_layers=1, H_cycles=2, L_cycles=2, halt_max_steps=3)


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# the nanoGPT spelling --json=PATH is an alias of --json_path=PATH
args = ['--json_path=' + a[len('--json='):] if a.startswith('--json=') else a for a in sys.argv[1:]]
try:
    configure(globals(), args)
except ConfigError as e:
    fail(str(e))
config = {k: globals()[k] for k in config_keys}
wanted = [s.strip() for s in sections.split(',') if s.strip()]
if not wanted or any(s not in SECTIONS for s in wanted):
    fail(f"sections={sections!r}: choose from {','.join(SECTIONS)}")
configs_wanted = train_configs.split(',')
if any(c not in ('paper', 'cpu') for c in configs_wanted):
    fail(f"train_configs={train_configs!r}: choose from paper,cpu")
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
try:  # an unknown or unavailable device fails here in one line
    torch.empty(0, device=device)
    device_type = torch.device(device).type
except (RuntimeError, AssertionError) as e:
    fail(f"device={device!r} is not usable: {e}")
if device_type not in ('cpu', 'cuda'):
    fail(f"device={device!r}: bench.py measures 'cpu' or 'cuda'")
on_gpu = device_type == 'cuda'
if dtype == 'auto':
    dtype = 'bfloat16' if on_gpu else 'float32'
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}.get(dtype)
if ptdtype is None:
    fail(f"dtype={dtype!r} is not one of auto, float32, bfloat16, float16")
if quick and not threads:
    threads = 1  # toy-sized ops gain nothing from more threads, and lose much when other processes share the cores
if threads > 0:
    torch.set_num_threads(threads)
if on_gpu:
    torch.cuda.set_device(torch.device(device).index or 0)  # CUDA events and stats go to the current device
    torch.backends.cuda.matmul.allow_tf32 = True  # as train.py
    torch.backends.cudnn.allow_tf32 = True


def size(value, gpu, cpu, toy):
    """A config value, or where it is left at 0 the size for this run."""
    return value or (toy if quick else gpu if on_gpu else cpu)


repeats = size(repeats, 20, 3, 1)
max_seconds = size(max_seconds, 3.0, 30.0, 5.0)
segments = size(segments, 16, 16, 2)
sample_repeats = size(sample_repeats, 2, 2, 1)


def train_settings(config_file=None):
    """(HRMConfig, settings) as train.py would run them: its defaults, then a config file. The defaults are
    train.py's literal module globals up to the end of its config block, read with ast (importing train.py
    would start a run), over model.py's HRMConfig defaults."""
    settings = {f.name: f.default for f in fields(HRMConfig)}
    for node in ast.parse(open(os.path.join(ROOT, 'train.py')).read()).body:
        docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        if docstring or isinstance(node, (ast.Import, ast.ImportFrom)):
            continue  # they come before the config
        if not isinstance(node, ast.Assign):
            break  # the end of the config block
        try:
            settings[node.targets[0].id] = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, AttributeError):
            pass  # a computed value (model_keys)
    if config_file:
        path = config_file if os.path.isabs(config_file) or os.path.exists(config_file) else os.path.join(ROOT, config_file)
        configure(settings, [path])
    return HRMConfig(**{f.name: settings[f.name] for f in fields(HRMConfig)}), settings


try:
    PAPER, CPU = train_settings(), train_settings(cpu_config)
except (ConfigError, ValueError, TypeError) as e:
    fail(f"cpu_config={cpu_config!r}: {e}")
if quick:
    PAPER, CPU = (replace(PAPER[0], **TOY), PAPER[1]), (replace(CPU[0], **TOY), CPU[1])
MODELS = {'paper': PAPER, 'cpu': CPU}
paper_batch = size(paper_batch, 768, 8, 4)
cpu_batch = size(cpu_batch, CPU[1]['global_batch_size'], CPU[1]['global_batch_size'], 4)
if sample_out_dir and not os.path.isfile(os.path.join(sample_out_dir, 'ckpt.pt')):
    fail(f"sample_out_dir={sample_out_dir!r} holds no ckpt.pt")

# -----------------------------------------------------------------------------
# measuring


def sync():
    if on_gpu:
        torch.cuda.synchronize(device)


def measure(fn, inner=1):
    """Time fn: its first call on its own (for compiled code mostly compilation; also the warm-up), then up to
    `repeats` timings of `inner` back-to-back calls, stopping after max_seconds. On GPU the timings are CUDA
    events, so short kernels are timed without a host round trip per call. Milliseconds per call."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first_s = time.perf_counter() - t0
    times, deadline = [], time.perf_counter() + max_seconds
    while len(times) < repeats and (not times or time.perf_counter() < deadline):
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append(1000 * (time.perf_counter() - t0) / inner)
    return dict(min_ms=min(times), median_ms=statistics.median(times), repeats=len(times), first_s=first_s)


def release_memory():
    """Free what earlier measurements left, so the next peak starts from a clean baseline."""
    torch._dynamo.reset()  # compiled code can hold on to the model it was compiled for
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    elif sys.platform.startswith('linux'):
        try:  # hand the freed heap back to the OS, else the resident-set baseline still counts it
            import ctypes
            ctypes.CDLL('libc.so.6').malloc_trim(0)
        except (OSError, AttributeError):
            pass


def proc_status(key):
    with open('/proc/self/status') as f:
        return int(re.search(rf'^{key}:\s+(\d+) kB', f.read(), re.M)[1]) * 1024


class PeakMemory:
    """Peak memory inside the block. GPU: torch.cuda.max_memory_allocated (and _reserved), everything the
    process holds, weights and optimizer state included. CPU: the growth of the resident set, from the
    kernel's high-water mark VmHWM (reset on entry through /proc/self/clear_refs); None off Linux."""

    def __enter__(self):
        release_memory()
        self.peak = self.reserved = self.baseline = None
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        else:
            try:
                with open('/proc/self/clear_refs', 'w') as f:
                    f.write('5')
                self.baseline = proc_status('VmRSS')
            except (OSError, TypeError):
                pass
        return self

    def __exit__(self, *exc):
        if on_gpu:
            self.peak, self.reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
        elif self.baseline is not None:
            self.peak = proc_status('VmHWM') - self.baseline


failures = []  # rows that failed for a reason other than memory: the exit code is 1 if any


def run_row(what, fn):
    """fn() -> a row's dict. A row that fails becomes {'failed': 'OOM'} or {'failed': 'error: ...'}, and
    the run goes on (a full GPU run is minutes one should not lose to one row)."""
    t0 = time.time()
    try:
        row = fn()
        print(f"{what}: done in {time.time() - t0:.1f} s", flush=True)
        return row
    except Exception as e:  # noqa: BLE001
        # CUDA's OutOfMemoryError, or another allocator's RuntimeError (cuBLAS, Triton, the CPU's)
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or re.search(r"out of memory|can't allocate memory", str(e))
        message = 'OOM' if oom else f"error: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        if not oom:
            traceback.print_exc()
            failures.append(f"{what}: {message}")
    print(f"{what}: {message}", flush=True)
    release_memory()  # out of the except block, where the traceback no longer holds the row's tensors
    return dict(failed=message)


def triton_problem(head_dim):
    """Why this run has no Triton rows at this head_dim, or None."""
    if not on_gpu:
        return "on CPU the Triton kernel runs only in its interpreter, a correctness tool, not a speed measure"
    return triton_attention_problem(head_dim, ptdtype, torch.device(device))


def gib(n):
    return '-' if n is None else f"{n / 2**30:.2f} GiB"


def rate(x):
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def ms(row):
    return f"{row['min_ms']:9.2f} / {row['median_ms']:9.2f}"


def mfu(tflops):
    peak = peak_tflops(torch.cuda.get_device_name(device)) if on_gpu and ptdtype != torch.float32 else None
    return (tflops / peak if peak else None), peak


def environment():
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cpu = platform.processor() or platform.machine()
    if os.path.exists('/proc/cpuinfo'):
        cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')), cpu)
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
               command=shlex.join(['python', *sys.argv]), python=platform.python_version(), torch=torch.__version__,
               triton=triton_version, device=device, dtype=dtype, cpu=cpu, cpu_count=os.cpu_count(),
               torch_threads=torch.get_num_threads(), platform=platform.platform(), quick=quick)
    if on_gpu:
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   peak_tflops=mfu(1.0)[1])
    return env


# -----------------------------------------------------------------------------
# the training step, as train.py runs it (on random tokens: speed does not depend on the puzzles)


def make_train_step(model_config, settings, batch_size, attn_impl, compiled, accumulation=1):
    """A fresh model and its optimizers; returns step(), one optimizer step over `accumulation` micro-batches
    of batch_size // accumulation puzzles, each with its own ACT carry that persists from step to step."""
    torch.manual_seed(seed)
    model = HRM(replace(model_config, attn_impl=attn_impl), dtype=ptdtype).to(device)
    network_params = [p for n, p in model.named_parameters() if n != 'puzzle_emb']
    optimizer = AdamATan2(network_params, lr=settings['lr'], betas=(settings['beta1'], settings['beta2']),
                          weight_decay=settings['weight_decay'], foreach=on_gpu)  # as train.py
    emb_optimizer = SignSGD([model.puzzle_emb], lr=settings['puzzle_emb_lr'],
                            weight_decay=settings['puzzle_emb_weight_decay'])
    forward = torch.compile(model) if compiled else model
    micro_batch = batch_size // accumulation
    carries = [model.initial_carry(micro_batch, torch.device(device)) for _ in range(accumulation)]
    generator = torch.Generator(device=device).manual_seed(seed)
    sums = {}

    def step():
        for micro in range(accumulation):
            inputs = torch.randint(1, 11, (micro_batch, 81), device=device, generator=generator)  # 1 = blank
            labels = torch.randint(2, 11, (micro_batch, 81), device=device, generator=generator)  # 2..10 = digits
            min_halt = model.exploration_draw(micro_batch, device, generator) if model_config.act == 'q' else None
            carries[micro], outputs = forward(carries[micro], inputs, labels, min_halt)
            loss, metrics = model.loss(carries[micro], outputs)
            (loss / batch_size).backward()
            for k, v in metrics.items():  # train.py's on-device metric sums
                sums[k] = sums.get(k, 0) + v
        optimizer.step()
        emb_optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        emb_optimizer.zero_grad(set_to_none=True)
    return step


def train_row(name, batch, attn_impl, compiled, accumulation=1):
    model_config, settings = MODELS[name]
    with PeakMemory() as memory:
        step = make_train_step(model_config, settings, batch, attn_impl, compiled, accumulation)
        result = measure(step)
        del step
    tflop = flops_per_step(model_config, batch) / 1e12
    seconds = result['median_ms'] / 1000
    return dict(**result, puzzles_per_s=batch / seconds, tflop_per_step=tflop, tflops=tflop / seconds,
                mfu=mfu(tflop / seconds)[0], peak_memory_bytes=memory.peak, peak_reserved_bytes=memory.reserved)


# -----------------------------------------------------------------------------
# the sections; each returns its JSON record and appends its lines to `table`

table = []


def bench_attention():
    B, S, H, D = size(attn_batch, 768, 32, 2), 82, 8, 64
    mask = sudoku_attention_mask().to(device)
    # q, k, v are views of one fused qkv tensor, as the model's qkv projection hands them over
    qkv = torch.randn(B, S, 3, H, D, device=device, dtype=ptdtype)
    grad_out = torch.randn(B, S, H, D, device=device, dtype=ptdtype)
    table.append(f"attention  B={B} S={S} H={H} D={D} {dtype}   ms per call, min / median")
    table.append(f"  {'impl':10s} {'mask':7s} {'forward':>21s}   {'forward+backward':>21s}")
    impls = [('triton', fused_attention), ('sdpa', sdpa_attention), ('reference', attention_reference)]
    if triton_problem(D):
        impls = impls[1:]
        table.append(f"  triton     skipped: {triton_problem(D)}")
    rows = []
    for name, fn in impls:
        for mask_name, m in (('none', None), ('sudoku', mask)):
            def forward():
                with torch.no_grad():
                    fn(*qkv.unbind(2), m)

            def forward_backward():
                leaf = qkv.detach().requires_grad_()
                torch.autograd.grad(fn(*leaf.unbind(2), m), leaf, grad_out)
            row = run_row(f"attention {name} {mask_name}", lambda: dict(
                forward=measure(forward, inner=10 if on_gpu else 1),
                forward_backward=measure(forward_backward, inner=10 if on_gpu else 1)))
            rows.append(dict(impl=name, mask=mask_name, **row))
            table.append(f"  {name:10s} {mask_name:7s} "
                         + (row.get('failed') or f"{ms(row['forward'])}   {ms(row['forward_backward'])}"))
    return dict(shape=dict(batch=B, seq=S, heads=H, head_dim=D), results=rows)


def bench_optimizer():
    shapes = [p.shape for n, p in HRM(PAPER[0]).named_parameters() if n != 'puzzle_emb']
    numel = sum(s.numel() for s in shapes)
    settings = PAPER[1]
    table.append(f"optimizer  AdamATan2 step, {numel / 1e6:.2f}M fp32 params in {len(shapes)} tensors   ms, min / median")
    rows = []
    for foreach in (True, False):
        def row():
            generator = torch.Generator(device=device).manual_seed(seed)
            params = [torch.nn.Parameter(0.02 * torch.randn(s, device=device, generator=generator)) for s in shapes]
            for p in params:
                p.grad = torch.randn(p.shape, device=device, generator=generator)
            optimizer = AdamATan2(params, lr=settings['lr'], betas=(settings['beta1'], settings['beta2']),
                                  weight_decay=settings['weight_decay'], foreach=foreach)
            return measure(optimizer.step)  # the first step, not timed, allocates the moments
        rows.append(dict(foreach=foreach, **run_row(f"optimizer foreach={foreach}", row)))
        table.append(f"  foreach={str(foreach):5s}          " + (rows[-1].get('failed') or ms(rows[-1])))
    speedup = None
    if not any('failed' in r for r in rows):
        speedup = rows[1]['median_ms'] / rows[0]['median_ms']
        table[-2] += f"   foreach speedup {speedup:.2f}x"
    return dict(params=numel, tensors=len(shapes), results=rows, foreach_speedup=speedup)


def train_table_line(label, batch, row):
    if 'failed' in row:
        return f"  {label:23s} {batch:5d}  {row['failed']}"
    mfu_text = '-' if row['mfu'] is None else f"{row['mfu']:.1%}"
    return (f"  {label:23s} {batch:5d} {ms(row)} {rate(row['puzzles_per_s']):>10s} {row['tflops']:8.3f} {mfu_text:>6s} "
            f"{gib(row['peak_memory_bytes']):>10s} {row['first_s']:9.1f}s")


TRAIN_COLUMNS = (f"{'batch':>5s} {'ms/step':>21s} {'puzzles/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak mem':>10s} "
                 f"{'first step':>10s}")


def bench_train():
    notes = [] if on_gpu or cpu_compile else ["compiled+sdpa skipped: cpu_compile=False (--cpu_compile=True times it; "
                                             "compiling takes minutes)"]
    table.append(f"train step  random tokens, {dtype}   ms per step, min / median; peak mem "
                 + ("allocated" if on_gpu else "= resident-set growth"))
    table.append(f"  {'config  variant':23s} {TRAIN_COLUMNS}")
    rows = []
    for name in configs_wanted:
        batch = paper_batch if name == 'paper' else cpu_batch
        tflop = flops_per_step(MODELS[name][0], batch) / 1e12
        variants = [('eager+sdpa', 'sdpa', False)]
        if cpu_compile and not on_gpu:
            variants.append(('compiled+sdpa', 'sdpa', True))
        problem = triton_problem(MODELS[name][0].hidden_size // MODELS[name][0].num_heads)
        if problem and f"no eager+triton or compiled+triton rows: {problem}" not in notes:
            notes.append(f"no eager+triton or compiled+triton rows: {problem}")
        elif not problem:
            variants += [('eager+triton', 'triton', False), ('compiled+triton', 'triton', True)]
        for variant, attn_impl, compiled in variants:
            row = run_row(f"train {name} {variant}", lambda: train_row(name, batch, attn_impl, compiled))
            rows.append(dict(config=name, variant=variant, batch=batch, **row))
            table.append(train_table_line(f"{name:7s} {variant}", batch, row))
        done = [r for r in rows if r['config'] == name and 'failed' not in r]
        if len(done) > 1 and done[0]['variant'] == 'eager+sdpa':
            best = min(done, key=lambda r: r['median_ms'])
            table.append(f"  {name:7s} best/plain {done[0]['median_ms'] / best['median_ms']:.2f}x "
                         f"({best['variant']} vs eager+sdpa, medians; {tflop:.4f} TFLOP a step)")
    table.extend(f"  note: {note}" for note in notes)
    return dict(results=rows, notes=notes, models={name: asdict(MODELS[name][0]) for name in configs_wanted})


def bench_memory():
    # the question is what fits on a GPU: the paper recipe's global batch there; on CPU the CPU config's
    name = 'paper' if on_gpu else 'cpu'
    global_batch = paper_batch if name == 'paper' else cpu_batch
    head_dim = MODELS[name][0].hidden_size // MODELS[name][0].num_heads
    variant = ('compiled' if accum_compile else 'eager') + ('+sdpa' if triton_problem(head_dim) else '+triton')
    table.append(f"memory  {name} config, global batch {global_batch} in micro-batches, {variant}, {dtype}")
    table.append(f"  {'micro x accum':23s} {TRAIN_COLUMNS} {'reserved':>10s}")
    rows = []
    for accumulation in [int(a) for a in accum_splits.split(',') if a.strip()]:
        if accumulation < 1 or global_batch % accumulation:
            table.append(f"  {accumulation} micro-batches skipped: they do not divide {global_batch}")
            continue
        micro = global_batch // accumulation
        row = run_row(f"memory micro-batch {micro}",
                      lambda: train_row(name, global_batch, 'auto', accum_compile, accumulation))
        rows.append(dict(micro_batch=micro, accumulation=accumulation, **row))
        table.append(train_table_line(f"{micro} x {accumulation}", global_batch, row)
                     + ('' if 'failed' in row else f" {gib(row['peak_reserved_bytes']):>10s}"))
    return dict(config=name, global_batch=global_batch, variant=variant, results=rows)


def bench_inference():
    table.append(f"inference  HRM.solve, {segments} segments, random puzzles; views=8 solves 1/8 the puzzles, "
                 f"so the same rows")
    table.append(f"  {'config  views':15s} {'puzzles':>7s} {'ms/solve':>21s} {'puzzles/s':>10s} {'TFLOP/s':>8s} "
                 f"{'MFU':>6s} {'first call':>10s}")
    rows = []
    for name in configs_wanted:
        model_config = MODELS[name][0]
        torch.manual_seed(seed)
        model = HRM(model_config, dtype=ptdtype).to(device).eval()
        for views in (1, 8):
            batch = max(1, size(infer_batch, 768, 1 if name == 'paper' else 32, 8) // views)

            def row():
                puzzles = torch.randint(0, 10, (batch, 81), device=device)  # cell values, 0 = blank
                result = measure(lambda: model.solve(puzzles, segments=segments, views=views))
                tflop = flops_per_step(model_config, batch * views, training=False) * segments / 1e12
                seconds = result['median_ms'] / 1000
                return dict(**result, puzzles_per_s=batch / seconds, tflop_per_solve=tflop, tflops=tflop / seconds,
                            mfu=mfu(tflop / seconds)[0])
            rows.append(dict(config=name, views=views, batch=batch, segments=segments,
                             **run_row(f"inference {name} views={views}", row)))
            r = rows[-1]
            table.append(f"  {name:7s} {views:5d}   {batch:7d} " + (r.get('failed') or (
                f"{ms(r)} {rate(r['puzzles_per_s']):>10s} {r['tflops']:8.3f} "
                f"{'-' if r['mfu'] is None else format(r['mfu'], '.1%'):>6s} {r['first_s']:9.1f}s")))
        del model
    with tempfile.TemporaryDirectory() as tmp:
        single = run_row("inference single puzzle", lambda: single_puzzle(sample_out_dir or tmp))
    if 'failed' in single:
        table.append(f"  single puzzle  {single['failed']}")
    return dict(batch=rows, single_puzzle=single)


def single_puzzle(out_dir):
    """One puzzle as sample.py solves it by default: load the checkpoint, then solve with ACT halting (or the run's
    eval_segments without a Q head) and sample.py's default views and check. In this process (warmed up), and
    `python sample.py` end to end, start-up included."""
    path = os.path.join(out_dir, 'ckpt.pt')
    which = out_dir if sample_out_dir else 'a random-init CPU-model checkpoint'
    if not sample_out_dir:  # what train.py saves, less the optimizer and data-order state that sample.py never reads
        torch.manual_seed(seed)
        run_config = {**CPU[1], **asdict(CPU[0])}
        torch.save({'model': HRM(CPU[0]).state_dict(), 'ema': None, 'config': run_config, 'step': 0}, path)
    puzzle = torch.from_numpy(sudoku.parse_grid(sample.EXAMPLE))[None].to(device)  # (1, 81) cell values, 0 = blank
    load_ms, solve_ms = [], []
    for i in range(1 + size(0, 5, 3, 1)):  # the first is a warm-up
        sync()
        t0 = time.perf_counter()
        model, run_config = load_checkpoint(path, device, dtype=ptdtype)
        sync()
        t1 = time.perf_counter()
        act = model.config.act == 'q'
        model.solve(puzzle, segments=None if act else run_config.get('eval_segments') or None, halt=act,
                    views=sample.views, check=sample.check, generator=torch.Generator(device=device).manual_seed(seed))
        sync()
        if i > 0:
            load_ms.append(1000 * (t1 - t0))
            solve_ms.append(1000 * (time.perf_counter() - t1))
    in_process = dict(load_ms=statistics.median(load_ms), solve_ms=statistics.median(solve_ms),
                      total_ms=statistics.median([a + b for a, b in zip(load_ms, solve_ms)]), repeats=len(load_ms))
    # the subprocess gets this run's device, dtype and threads
    command = [sys.executable, 'sample.py', f'--out_dir={os.path.abspath(out_dir)}', f'--puzzle={sample.EXAMPLE}',
               f'--device={device}', f'--dtype={dtype}']
    child_env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads > 0 else None
    runs = []
    for _ in range(sample_repeats):  # no warm-up run: this process has already read every file it imports
        t0 = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=child_env, timeout=300)
        wall_ms = 1000 * (time.perf_counter() - t0)
        if done.returncode != 0:
            raise RuntimeError(f"{shlex.join(command)} exited {done.returncode}: {done.stderr.strip()[-300:]}")
        found = re.search(r"load (\d+) ms, solve (\d+) ms", done.stdout)
        runs.append(dict(wall_ms=wall_ms, load_ms=found and int(found[1]), solve_ms=found and int(found[2])))
    walls = [r['wall_ms'] for r in runs]
    sample_py = dict(command=shlex.join(['python', *command[1:]]), runs=runs, min_ms=min(walls),
                     median_ms=statistics.median(walls))
    table.append(f"  single puzzle, {which}, sample.py's defaults (views={sample.views}, check={sample.check}, "
                 f"{'ACT halting' if act else 'its eval_segments'})")
    table.append(f"  in process: load {in_process['load_ms']:.1f} ms + solve {in_process['solve_ms']:.1f} ms "
                 f"= {in_process['total_ms']:.1f} ms (median of {len(load_ms)})")
    table.append(f"  `python sample.py` end to end: {sample_py['min_ms']:.0f} / {sample_py['median_ms']:.0f} ms "
                 f"min / median of {len(runs)}" + (found and f" (its own report: load {found[1]} ms, solve {found[2]} ms; "
                                                   f"the rest is interpreter and import start-up)" or ''))
    return dict(checkpoint=which, in_process=in_process, sample_py=sample_py)


# -----------------------------------------------------------------------------

t_start = time.time()
load_before = os.getloadavg() if hasattr(os, 'getloadavg') else None
env = environment()
paper_tflop = flops_per_step(HRMConfig(), 768) / 1e12
title = (f"nanoHRM bench{' --quick' if quick else ''} | {env.get('gpu', env['cpu'])} | {device} {dtype} | "
         f"torch {env['torch']} | triton {env['triton']} | {env['cpu_count']} CPUs, {env['torch_threads']} threads")
print(f"{title} | load average {load_before}", flush=True)
record = dict(environment=env, config=config, load_average_before=load_before, paper_tflop_per_step_at_768=paper_tflop)
runners = dict(attention=bench_attention, optimizer=bench_optimizer, train=bench_train, memory=bench_memory,
               inference=bench_inference)


def write_json():
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, 'w') as f:
            json.dump(record, f, indent=1)


for section in SECTIONS:
    if section in wanted:
        t0, first_line = time.time(), len(table)
        record[section] = run_row(section, runners[section])  # a section that fails still leaves the others
        record[section]['section_s'] = time.time() - t0
        if 'failed' in record[section]:
            table.insert(first_line, f"{section}  {record[section]['failed']}")
        table[first_line] += f"   [{record[section]['section_s']:.0f} s]"
        write_json()  # after every section, so a run cut short (a lease that ends) keeps what it measured
        release_memory()
record['load_average_after'] = os.getloadavg() if hasattr(os, 'getloadavg') else None
record['runtime_s'] = time.time() - t_start
record['failures'] = failures
write_json()

print(f"\n== {title} | {env['date']} ==")
print(f"paper config at batch 768: {paper_tflop:.2f} TFLOP per training step (analytic, flops_per_step)")
print('\n'.join(table))
print(f"load average before {load_before}, after {record['load_average_after']} | {record['runtime_s']:.0f} s in all"
      + (f" | wrote {json_path}" if json_path else ''))
if failures:
    print(f"{len(failures)} row(s) failed:\n  " + '\n  '.join(failures), file=sys.stderr)
    sys.exit(1)
