"""
Speed and memory of nanoHRM on whatever device this runs on (the first CUDA GPU if there is one, else the CPU):
    python bench.py                                    # every section, sizes chosen for the device
    python bench.py --sections=attention,optimizer     # a subset
    python bench.py --json=docs/bench_h100.json        # also write every number and the environment
Sections:
    attention  Triton kernel vs SDPA vs the naive reference, forward and forward+backward, at the HRM shape
    optimizer  one AdamATan2 step over the paper model's parameters, foreach=True vs foreach=False
    train      the full training step as train.py runs it, paper config and CPU config, per attention/compile variant
    memory     peak GPU memory of the paper recipe's step per micro-batch size (gradient accumulation); GPU only
    inference  batch solving at 16 segments, and single-puzzle latency as sample.py sees it
Every timing excludes warm-up, synchronizes the GPU, and reports min and median over repeats. On a shared
machine the numbers are noisy: compare rows of one run, not runs on different days.
"""

import datetime
import gc
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, fields, replace

import numpy as np
import torch

import prepare_sudoku as sudoku
import sample
from configurator import ConfigError, configure
from model import (HAS_TRITON, HRM, HRMConfig, attention_reference, flops_per_step, fused_attention,
                   sdpa_attention, sudoku_attention_mask)
from model import peak_tflops as gpu_peak_tflops  # bench's config key peak_tflops overrides the lookup
from optim import AdamATan2, SignSGD

# -----------------------------------------------------------------------------
# config; 0 / -1 mean "chosen for the device" (see the defaults resolved below)
sections = 'attention,optimizer,train,memory,inference'
device = 'auto'               # 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'
dtype = 'auto'                # 'auto' (bfloat16 on CUDA, float32 on CPU, as train.py), 'bfloat16', 'float32'
json_path = ''                # write every number and the environment here (also spelled --json=PATH)
seed = 0
threads = 0                   # CPU threads for torch (0 = torch's default, one per core, as train.py and sample.py run)
warmup = -1                   # warm-up calls before each measurement (-1 = per section and device)
repeats = 0                   # timed repeats per measurement (0 = per section and device)
data_dir = ''                 # a prepared dataset: train and solve real puzzles instead of random tokens
cpu_config = 'config/sudoku_cpu.py'
# attention
attn_batch = 0                # 0 = 768 on CUDA (the paper's batch on one GPU), 32 on CPU
# train
paper_batch = 0               # puzzles per step, paper config: 0 = 768 on CUDA, 8 on CPU (~20 s a step on 2 cores)
cpu_batch = 0                 # puzzles per step, CPU config: 0 = its global_batch_size
train_configs = 'paper,cpu'   # which configs the train section times
cpu_compile = False           # on CPU also time torch.compile + SDPA (needs a C++ compiler; compiling takes minutes)
peak_tflops = 0.0             # the GPU's peak dense bf16 TFLOP/s for MFU (0 = look up its name in model.PEAK_TFLOPS)
# memory (GPU only)
accum_global_batch = 768      # the paper recipe's global batch, split into micro-batches
accum_micro_batches = '768,384,192,96,48'
accum_compile = True          # compiled + Triton, as train.py runs on CUDA
# inference
segments = 16
infer_paper_batch = 0         # 0 = 768 on CUDA, 1 on CPU (16 segments of the paper model: ~220 GFLOP a puzzle)
infer_cpu_batch = 0           # 0 = 768 on CUDA, 32 on CPU
sample_out_dir = ''           # a train.py out_dir holding ckpt.pt; '' = a random-init CPU-model checkpoint in a temp dir
sample_repeats = 2            # end-to-end `python sample.py` runs timed (after one warm-up run)
# -----------------------------------------------------------------------------

SECTIONS = ('attention', 'optimizer', 'train', 'memory', 'inference')
# the optimizer settings of train.py's defaults (the paper recipe); the CPU config overrides some
TRAIN_DEFAULTS = dict(global_batch_size=768, lr=1e-4, puzzle_emb_lr=1e-4, weight_decay=1.0,
                      puzzle_emb_weight_decay=1.0, beta1=0.9, beta2=0.95)
ROOT = os.path.dirname(os.path.abspath(__file__))


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# the nanoGPT spelling --json=PATH is an alias of --json_path=PATH
args = ['--json_path=' + a[len('--json='):] if a.startswith('--json=') else a for a in sys.argv[1:]]
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
try:
    configure(globals(), args)
except ConfigError as e:
    fail(str(e))
config = {k: globals()[k] for k in config_keys}
wanted = [s.strip() for s in sections.split(',') if s.strip()]
unknown = [s for s in wanted if s not in SECTIONS]
if unknown or not wanted:
    fail(f"sections={sections!r}: choose from {','.join(SECTIONS)}")
if not train_configs or any(c not in ('paper', 'cpu') for c in train_configs.split(',')):
    fail(f"train_configs={train_configs!r}: choose from paper,cpu")

if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
try:
    device_type = torch.device(device).type
except RuntimeError:
    fail(f"device={device!r} is not a torch device")
if device_type not in ('cpu', 'cuda'):
    fail(f"device={device!r}: bench.py measures 'cpu' or 'cuda'")
if device_type == 'cuda' and not torch.cuda.is_available():
    fail(f"device={device!r} but torch sees no CUDA GPU")
on_gpu = device_type == 'cuda'
if dtype == 'auto':
    dtype = 'bfloat16' if on_gpu else 'float32'
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}.get(dtype)
if ptdtype is None:
    fail(f"dtype={dtype!r} is not one of auto, float32, bfloat16, float16")
if threads > 0:
    torch.set_num_threads(threads)
if on_gpu:
    if torch.device(device).index is not None:  # set_device('cuda') without an index raises
        torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True  # as train.py
    torch.backends.cudnn.allow_tf32 = True


def pick(value, on_gpu_value, on_cpu_value, unset=0):
    """A config value, or the device's default where it is left unset (0; -1 for warmup)."""
    return value if value > unset else on_gpu_value if on_gpu else on_cpu_value


def resolve(path):
    # relative paths work from the repo root or from anywhere else
    return path if os.path.isabs(path) or os.path.exists(path) else os.path.join(ROOT, path)


def read_cpu_config():
    """The CPU model (HRMConfig fields) and its training settings, from the config file train.py reads."""
    path = resolve(cpu_config)
    if not os.path.isfile(path):
        fail(f"cpu_config={cpu_config!r} not found")
    scope = {}
    exec(compile(open(path).read(), path, 'exec'), scope)
    model_config = HRMConfig(**{f.name: scope[f.name] for f in fields(HRMConfig) if f.name in scope})
    return model_config, {k: scope.get(k, v) for k, v in TRAIN_DEFAULTS.items()}


PAPER = (HRMConfig(), dict(TRAIN_DEFAULTS))
try:
    CPU = read_cpu_config()
except (ValueError, TypeError, SyntaxError) as e:
    fail(f"cpu_config={cpu_config!r}: {e}")
train_rows = test_rows = None
if data_dir:
    try:
        train_rows = torch.from_numpy(np.array(sudoku.read_split(resolve(data_dir), 'train'))).to(device)
        test_rows = torch.from_numpy(np.array(sudoku.read_split(resolve(data_dir), 'test'))).to(device)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
if sample_out_dir and not os.path.isfile(os.path.join(sample_out_dir, 'ckpt.pt')):
    fail(f"sample_out_dir={sample_out_dir!r} holds no ckpt.pt")
torch.manual_seed(seed)

# -----------------------------------------------------------------------------
# measuring


def sync():
    if on_gpu:
        torch.cuda.synchronize()


def measure(fn, n_warmup, n_repeats, inner=1):
    """Time fn: n_warmup untimed calls, then n_repeats timings of `inner` back-to-back calls each (CUDA events
    on GPU, so short kernels are timed without a host round trip per call). Milliseconds per call."""
    for _ in range(n_warmup):
        fn()
    times = []
    for _ in range(n_repeats):
        sync()  # start from an idle device, so queued work from before is not counted
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
    return dict(min_ms=min(times), median_ms=statistics.median(times), repeats=n_repeats, warmup=n_warmup, inner=inner)


def release_memory():
    """Free what earlier measurements left, so the next peak starts from a clean baseline."""
    torch._dynamo.reset()  # compiled code can hold on to the model it was compiled for
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    elif sys.platform.startswith('linux'):
        try:  # hand freed heap back to the OS, else the RSS baseline still counts it
            import ctypes
            ctypes.CDLL('libc.so.6').malloc_trim(0)
        except (OSError, AttributeError):
            pass


class PeakMemory:
    """Peak memory while inside the block: torch.cuda.max_memory_allocated on GPU; on CPU the highest
    resident set size, sampled every 5 ms from /proc, minus the size on entry (None off Linux)."""

    def __enter__(self):
        release_memory()
        self.peak = self.reserved = None
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        elif os.path.exists('/proc/self/statm'):
            self.baseline = self.highest = self.rss()
            self.running = True
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
        return self

    @staticmethod
    def rss():
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')

    def sample(self):
        while self.running:
            self.highest = max(self.highest, self.rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        if on_gpu:
            self.peak, self.reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        elif hasattr(self, 'thread'):
            self.running = False
            self.thread.join()
            self.peak = max(self.highest, self.rss()) - self.baseline


def peak_flops():
    """Peak dense TFLOP/s of this GPU in the compute dtype, or None (CPU, fp32, an unknown GPU)."""
    if peak_tflops > 0:
        return peak_tflops
    if not on_gpu or ptdtype == torch.float32:
        return None
    return gpu_peak_tflops(torch.cuda.get_device_name())


def gib(n):
    return '-' if n is None else f"{n / 2**30:.2f} GiB"


def rate(x):
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def ms(result):
    return f"{result['min_ms']:9.2f} / {result['median_ms']:9.2f}"


def cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment():
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
               command=shlex.join(['python', *sys.argv]), python=platform.python_version(), torch=torch.__version__,
               triton=triton_version, numpy=np.__version__, device=device, dtype=dtype, cpu=cpu_name(),
               cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), platform=platform.platform())
    if on_gpu:
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   peak_tflops=peak_flops())
    return env


# -----------------------------------------------------------------------------
# the training step, as train.py runs it


def get_batch(batch_size, generator):
    """(inputs, labels) tokens, (B, 81): random ones, or augmented training puzzles when data_dir is set."""
    if train_rows is None:
        inputs = torch.randint(1, 11, (batch_size, 81), device=device, generator=generator)
        labels = torch.randint(2, 11, (batch_size, 81), device=device, generator=generator)
        return inputs, labels
    index = torch.randint(0, len(train_rows), (batch_size,), device=device, generator=generator)
    puzzles, solutions = sudoku.augment(train_rows[index, :81], train_rows[index, 81:], generator=generator)
    return puzzles.long() + 1, solutions.long() + 1


def make_train_step(model_config, settings, batch_size, attn_impl, compiled, accumulation=1):
    """A fresh model and its optimizers; returns step(), one optimizer step over `accumulation` micro-batches
    of batch_size // accumulation puzzles, each with its own ACT carry that persists from step to step."""
    if compiled:
        torch._dynamo.reset()  # a fresh cache per model, so no variant hits the recompile limit and runs eager
    torch.manual_seed(seed)
    model = HRM(replace(model_config, attn_impl=attn_impl), dtype=ptdtype).to(device)
    network_params = [p for n, p in model.named_parameters() if n != 'puzzle_emb']
    optimizer = AdamATan2(network_params, lr=settings['lr'], betas=(settings['beta1'], settings['beta2']),
                          weight_decay=settings['weight_decay'])
    emb_optimizer = SignSGD([model.puzzle_emb], lr=settings['puzzle_emb_lr'], weight_decay=settings['puzzle_emb_weight_decay'])
    forward = torch.compile(model) if compiled else model
    micro_batch = batch_size // accumulation
    carries = [model.initial_carry(micro_batch, torch.device(device)) for _ in range(accumulation)]
    generator = torch.Generator(device=device).manual_seed(seed)
    window = {}

    def step():
        for micro in range(accumulation):
            inputs, labels = get_batch(micro_batch, generator)
            min_halt = model.exploration_draw(micro_batch, device, generator) if model_config.act == 'q' else None
            carries[micro], outputs = forward(carries[micro], inputs, labels, min_halt)
            loss, metrics = model.loss(carries[micro], outputs)
            (loss / batch_size).backward()
            metrics['loss'] = loss.detach()
            for k, v in metrics.items():  # train.py's on-device metric sums
                window[k] = window.get(k, 0) + v
        optimizer.step()
        emb_optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        emb_optimizer.zero_grad(set_to_none=True)
    return step


def time_first_call(fn):
    """Seconds of one call: the first step of a compiled model is mostly compilation."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


# -----------------------------------------------------------------------------
# the sections; each returns its JSON record and appends its lines to `table`

table = []


def bench_attention():
    B, S, H, D = pick(attn_batch, 768, 32), 82, 8, 64
    n_warmup, n_repeats, inner = pick(warmup, 5, 2, unset=-1), pick(repeats, 20, 10), 10 if on_gpu else 1
    mask = sudoku_attention_mask().to(device)
    # q, k, v are views of one fused qkv tensor, as the model's qkv projection hands them over
    qkv = torch.randn(B, S, 3, H, D, device=device, dtype=ptdtype)
    grad_out = torch.randn(B, S, H, D, device=device, dtype=ptdtype)
    impls = [('triton', fused_attention), ('sdpa', sdpa_attention), ('reference', attention_reference)]
    rows, notes = [], []
    table.append(f"attention  B={B} S={S} H={H} D={D} {dtype}   ms per call, min / median")
    table.append(f"  {'impl':10s} {'mask':7s} {'forward':>21s}   {'forward+backward':>21s}")
    for name, fn in impls:
        if name == 'triton' and not (on_gpu and HAS_TRITON):
            note = ("skipped: on CPU Triton runs only in its interpreter, a correctness tool, not a speed measure"
                    if not on_gpu else "skipped: triton is not installed")
            notes.append(f"attention triton: {note}")
            table.append(f"  {name:10s} {'-':7s} {note}")
            continue
        for mask_name, m in (('none', None), ('sudoku', mask)):
            def forward():
                with torch.no_grad():
                    fn(*qkv.unbind(2), m)

            def forward_backward():
                leaf = qkv.detach().requires_grad_()
                torch.autograd.grad(fn(*leaf.unbind(2), m), leaf, grad_out)
            fwd = measure(forward, n_warmup, n_repeats, inner)
            fwd_bwd = measure(forward_backward, n_warmup, n_repeats, inner)
            rows.append(dict(impl=name, mask=mask_name, forward=fwd, forward_backward=fwd_bwd))
            table.append(f"  {name:10s} {mask_name:7s} {ms(fwd)}   {ms(fwd_bwd)}")
            print(f"attention {name} mask={mask_name}: forward {fwd['median_ms']:.2f} ms, "
                  f"forward+backward {fwd_bwd['median_ms']:.2f} ms", flush=True)
    return dict(shape=dict(batch=B, seq=S, heads=H, head_dim=D), dtype=dtype, results=rows, notes=notes)


def bench_optimizer():
    n_warmup, n_repeats = pick(warmup, 3, 1, unset=-1), pick(repeats, 20, 3)
    shapes = [p.shape for n, p in HRM(HRMConfig()).named_parameters() if n != 'puzzle_emb']
    numel = sum(s.numel() for s in shapes)
    rows = []
    table.append(f"optimizer  AdamATan2 step, {numel / 1e6:.2f}M fp32 params in {len(shapes)} tensors   ms, min / median")
    for foreach in (True, False):
        generator = torch.Generator(device=device).manual_seed(seed)
        params = [torch.nn.Parameter(0.02 * torch.randn(s, device=device, generator=generator)) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, device=device, generator=generator)
        optimizer = AdamATan2(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=1.0, foreach=foreach)
        result = measure(optimizer.step, n_warmup, n_repeats)  # the first step allocates the moments
        rows.append(dict(foreach=foreach, **result))
        print(f"optimizer foreach={foreach}: {result['median_ms']:.2f} ms", flush=True)
        del params, optimizer
    speedup = rows[1]['median_ms'] / rows[0]['median_ms']
    for row in rows:
        extra = f"   foreach speedup {speedup:.2f}x" if row["foreach"] else ""
        table.append(f"  foreach={str(row['foreach']):5s}          {ms(row)}{extra}")
    return dict(params=numel, tensors=len(shapes), results=rows, foreach_speedup=speedup)


def train_variants():
    variants, notes = [('eager+sdpa', 'sdpa', False)], []
    if on_gpu:
        if HAS_TRITON:
            variants += [('eager+triton', 'triton', False), ('compiled+triton', 'triton', True)]
        else:
            notes.append("triton is not installed: no eager+triton or compiled+triton rows")
    else:
        notes.append("eager+triton and compiled+triton skipped: the Triton kernel runs on CPU only in its interpreter")
        compiler = next((c for c in (os.environ.get('CXX'), 'g++', 'c++', 'clang++') if c and shutil.which(c)), None)
        if cpu_compile and compiler:
            variants.append(('compiled+sdpa', 'sdpa', True))
        else:
            notes.append("compiled+sdpa skipped: " + ("no C++ compiler found" if cpu_compile else
                         "cpu_compile=False (set --cpu_compile=True to time it; compiling takes minutes)"))
    return variants, notes


def bench_train():
    variants, notes = train_variants()
    peak = peak_flops()
    cases = [('paper', PAPER, pick(paper_batch, 768, 8), (pick(warmup, 5, 1, unset=-1), pick(repeats, 20, 2))),
             ('cpu', CPU, cpu_batch or CPU[1]['global_batch_size'], (pick(warmup, 5, 3, unset=-1), pick(repeats, 20, 10)))]
    cases = [case for case in cases if case[0] in train_configs.split(',')]
    rows = []
    table.append(f"train step  {'data' if data_dir else 'random tokens'}, {dtype}   ms per step, min / median")
    table.append(f"  {'config':6s} {'variant':16s} {'batch':>5s} {'ms/step':>21s} {'puzzles/s':>10s} {'TFLOP/step':>10s} "
                 f"{'TFLOP/s':>8s} {'MFU':>6s} {'peak mem':>10s} {'first step':>10s}")
    for name, (model_config, settings), batch, (n_warmup, n_repeats) in cases:
        tflop = flops_per_step(model_config, batch) / 1e12
        case_rows = []
        for variant, attn_impl, compiled in variants:
            with PeakMemory() as memory:
                step = make_train_step(model_config, settings, batch, attn_impl, compiled)
                first_s = time_first_call(step)
                result = measure(step, max(0, n_warmup - 1), n_repeats)
                del step
            seconds = result['median_ms'] / 1000
            row = dict(config=name, variant=variant, batch=batch, **result, puzzles_per_s=batch / seconds,
                       tflop_per_step=tflop, tflops=tflop / seconds, mfu=tflop / seconds / peak if peak else None,
                       peak_memory_bytes=memory.peak, peak_reserved_bytes=memory.reserved, first_step_s=first_s)
            case_rows.append(row)
            mfu = '-' if row['mfu'] is None else f"{row['mfu']:.1%}"
            table.append(f"  {name:6s} {variant:16s} {batch:5d} {ms(result)} {rate(row['puzzles_per_s']):>10s} {tflop:10.4f} "
                         f"{row['tflops']:8.3f} {mfu:>6s} {gib(memory.peak):>10s} {first_s:9.1f}s")
            print(f"train {name} {variant} batch {batch}: {result['median_ms']:.1f} ms/step, "
                  f"{rate(row['puzzles_per_s'])} puzzles/s, first step {first_s:.1f} s", flush=True)
        best = min(case_rows, key=lambda r: r['median_ms'])
        speedup = case_rows[0]['median_ms'] / best['median_ms']
        table.append(f"  {name:6s} best/plain {speedup:.2f}x ({best['variant']} vs eager+sdpa, medians)")
        for row in case_rows:
            row['speedup_vs_plain'] = case_rows[0]['median_ms'] / row['median_ms']
        rows += case_rows
    for note in notes:
        table.append(f"  note: {note}")
    return dict(results=rows, notes=notes, peak_tflops=peak,
                models={'paper': asdict(PAPER[0]), 'cpu': asdict(CPU[0])})


def bench_memory():
    if not on_gpu:
        note = "skipped: peak memory per micro-batch is a GPU question (CPU RSS is in the train rows)"
        table.append(f"memory  {note}")
        return dict(skipped=note)
    n_warmup, n_repeats = pick(warmup, 3, 1, unset=-1), pick(repeats, 10, 1)
    variant = 'compiled+triton' if accum_compile else 'eager+auto'
    table.append(f"memory  paper config, global batch {accum_global_batch} in micro-batches, {variant}, {dtype}")
    table.append(f"  {'micro':>5s} {'accum':>5s} {'peak alloc':>11s} {'peak reserved':>13s} {'ms/step':>21s} {'puzzles/s':>10s}")
    rows = []
    for micro in [int(m) for m in accum_micro_batches.split(',') if m.strip()]:
        if accum_global_batch % micro:
            table.append(f"  {micro:5d}  skipped: does not divide {accum_global_batch}")
            continue
        accumulation = accum_global_batch // micro
        try:
            with PeakMemory() as memory:
                step = make_train_step(PAPER[0], PAPER[1], accum_global_batch, 'auto', accum_compile, accumulation)
                result = measure(step, n_warmup, n_repeats)
                del step
        except torch.cuda.OutOfMemoryError:
            release_memory()
            rows.append(dict(micro_batch=micro, accumulation=accumulation, oom=True))
            table.append(f"  {micro:5d} {accumulation:5d}  out of memory")
            continue
        puzzles_per_s = accum_global_batch / (result['median_ms'] / 1000)
        rows.append(dict(micro_batch=micro, accumulation=accumulation, peak_memory_bytes=memory.peak,
                         peak_reserved_bytes=memory.reserved, puzzles_per_s=puzzles_per_s, **result))
        table.append(f"  {micro:5d} {accumulation:5d} {gib(memory.peak):>11s} {gib(memory.reserved):>13s} {ms(result)} "
                     f"{rate(puzzles_per_s):>10s}")
        print(f"memory micro-batch {micro} x {accumulation}: peak {gib(memory.peak)}, {result['median_ms']:.1f} ms/step", flush=True)
    return dict(global_batch=accum_global_batch, variant=variant, results=rows)


def bench_inference():
    rows = []
    table.append(f"inference  HRM.solve, {segments} segments, attn_impl='auto', {'test puzzles' if data_dir else 'random tokens'}")
    table.append(f"  {'config':6s} {'batch':>5s} {'ms/batch':>21s} {'puzzles/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s}")
    peak = peak_flops()
    # on CPU the one-segment warm-up below is the only warm-up: a 16-segment solve is long there
    cases = [('paper', PAPER[0], pick(infer_paper_batch, 768, 1), (pick(warmup, 2, 0, unset=-1), pick(repeats, 5, 1))),
             ('cpu', CPU[0], pick(infer_cpu_batch, 768, 32), (pick(warmup, 2, 0, unset=-1), pick(repeats, 5, 2)))]
    for name, model_config, batch, (n_warmup, n_repeats) in cases:
        torch.manual_seed(seed)
        model = HRM(model_config, dtype=ptdtype).to(device).eval()
        if test_rows is None:
            inputs = torch.randint(1, 11, (batch, 81), device=device)
        else:
            inputs = test_rows[torch.arange(batch, device=device) % len(test_rows), :81].long() + 1
        model.solve(inputs, segments=1)  # a one-segment warm-up: allocations and kernel compilation
        result = measure(lambda: model.solve(inputs, segments=segments), n_warmup, n_repeats)
        tflop = flops_per_step(model_config, batch, training=False) * segments / 1e12
        seconds = result['median_ms'] / 1000
        row = dict(config=name, batch=batch, segments=segments, **result, puzzles_per_s=batch / seconds,
                   tflop_per_solve=tflop, tflops=tflop / seconds, mfu=tflop / seconds / peak if peak else None)
        rows.append(row)
        mfu = '-' if row['mfu'] is None else f"{row['mfu']:.1%}"
        table.append(f"  {name:6s} {batch:5d} {ms(result)} {rate(row['puzzles_per_s']):>10s} {row['tflops']:8.3f} {mfu:>6s}")
        print(f"inference {name} batch {batch}: {rate(row['puzzles_per_s'])} puzzles/s", flush=True)
        del model

    # single-puzzle latency, as sample.py sees it: a checkpoint on disk, one puzzle, ACT halting
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = sample_out_dir
        if not out_dir:
            out_dir = tmp
            torch.manual_seed(seed)
            model = HRM(CPU[0])
            torch.save({'model': model.state_dict(), 'config': asdict(CPU[0]), 'ema': None}, os.path.join(tmp, 'ckpt.pt'))
        which = sample_out_dir or 'a random-init CPU-model checkpoint'
        table.append(f"  single puzzle, {which}, sample.py's defaults (ACT halting, at most halt_max_steps segments)")
        sample.out_dir = out_dir
        inputs = torch.from_numpy(sudoku.parse_grid(sample.EXAMPLE)).to(device)[None].long() + 1
        load_ms, solve_ms = [], []
        for i in range(1 + pick(repeats, 5, 3)):  # the first is a warm-up
            sync()
            t0 = time.perf_counter()
            model = sample.load_model(torch.device(device))  # torch.load + HRM construction + load_state_dict
            sync()
            t1 = time.perf_counter()
            model.solve(inputs, segments=None, halt=True)
            sync()
            if i > 0:
                load_ms.append(1000 * (t1 - t0))
                solve_ms.append(1000 * (time.perf_counter() - t1))
        in_process = dict(load_ms=statistics.median(load_ms), solve_ms=statistics.median(solve_ms),
                          total_ms=statistics.median([a + b for a, b in zip(load_ms, solve_ms)]), repeats=len(load_ms))
        table.append(f"  in process: load {in_process['load_ms']:.1f} ms + solve {in_process['solve_ms']:.1f} ms "
                     f"= {in_process['total_ms']:.1f} ms (median of {len(load_ms)})")
        runs = []
        child_env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads > 0 else None  # the same threads as here
        command = [sys.executable, 'sample.py', f'--out_dir={os.path.abspath(out_dir)}', f'--puzzle={sample.EXAMPLE}']
        for i in range(1 + sample_repeats):  # the first is a warm-up (file cache, bytecode)
            t0 = time.perf_counter()
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=child_env)
            wall = time.perf_counter() - t0
            if done.returncode != 0:
                fail(f"{shlex.join(command)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
            found = re.search(r"load (\d+) ms, solve (\d+) ms", done.stdout)
            if i > 0:
                runs.append(dict(wall_ms=1000 * wall, load_ms=int(found[1]) if found else None,
                                 solve_ms=int(found[2]) if found else None))
        walls = [r['wall_ms'] for r in runs]
        subprocess_record = dict(command=shlex.join(['python', *command[1:]]), runs=runs,
                                 min_ms=min(walls), median_ms=statistics.median(walls))
        table.append(f"  `python sample.py` end to end: {subprocess_record['min_ms']:.0f} / {subprocess_record['median_ms']:.0f} ms "
                     f"min / median of {len(runs)}"
                     + (f" (its own report: load {runs[-1]['load_ms']} ms, solve {runs[-1]['solve_ms']} ms; "
                        f"the rest is interpreter and import start-up)" if runs[-1]['load_ms'] is not None else ''))
        print(f"inference single puzzle: in process {in_process['total_ms']:.0f} ms, "
              f"sample.py {subprocess_record['median_ms']:.0f} ms", flush=True)
    return dict(batch=rows, single_puzzle=dict(checkpoint=which, in_process=in_process, sample_py=subprocess_record))


# -----------------------------------------------------------------------------

t_start = time.time()
load_before = os.getloadavg() if hasattr(os, 'getloadavg') else None
env = environment()
paper_tflop = flops_per_step(PAPER[0], TRAIN_DEFAULTS['global_batch_size']) / 1e12
print(f"nanoHRM bench on {env.get('gpu', env['cpu'])} ({device}, {dtype}) | torch {env['torch']} | triton {env['triton']} | "
      f"{env['cpu_count']} CPUs, {env['torch_threads']} torch threads | load average {load_before}", flush=True)
record = dict(environment=env, config=config, load_average_before=load_before,
              paper_tflop_per_step_at_768=paper_tflop)
runners = dict(attention=bench_attention, optimizer=bench_optimizer, train=bench_train, memory=bench_memory,
               inference=bench_inference)
for section in SECTIONS:
    if section in wanted:
        t0 = time.time()
        record[section] = runners[section]()
        record[section]['section_s'] = time.time() - t0
        release_memory()
record['load_average_after'] = os.getloadavg() if hasattr(os, 'getloadavg') else None
record['runtime_s'] = time.time() - t_start

print()
print(f"== nanoHRM bench | {env.get('gpu', env['cpu'])} | {device} {dtype} | torch {env['torch']} | triton {env['triton']} | "
      f"{env['cpu_count']} CPUs, {env['torch_threads']} threads | {env['date']} ==")
print(f"paper config at batch 768: {paper_tflop:.2f} TFLOP per training step (analytic, flops_per_step)")
for line in table:
    print(line)
print(f"load average before {load_before}, after {record['load_average_after']} | {record['runtime_s']:.0f} s in all")
if json_path:
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, 'w') as f:
        json.dump(record, f, indent=1)
    print(f"wrote {json_path}")
