"""
Speed and memory of nanoHRM on this machine (the first CUDA GPU if there is one, else the CPU):
    python bench.py                                  # every section, sizes chosen for the device
    python bench.py --sections=train,inference --json=bench.json
    python bench.py --quick                          # every section at toy sizes, in seconds (tests/test_bench.py)
Sections: attention (Triton kernel, SDPA, naive), optimizer (AdamATan2 foreach vs per-tensor), train (the step as
train.py runs it), memory (the step per micro-batch size), inference (HRM.solve, and one puzzle as sample.py solves
it). A row that runs out of memory reads OOM; one that fails otherwise prints its error and the exit code is then 1;
either way the run goes on.
"""

import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, fields, replace

import torch

import prepare_sudoku as sudoku
import sample
from configurator import ConfigError, configure, fail
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
threads = 0                   # CPU threads: 0 = torch's default (quick: 1)
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
infer_batch = 0               # puzzles per solve at views=1 (views=8: 1/8 of them): 0 = 768 on GPU; CPU: 1, cpu 32
sample_out_dir = ''           # a train.py out_dir whose ckpt.pt the single puzzle loads; '' = a random-init CPU model
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
try:  # also accepted: --quick for --quick=True, and nanoGPT's --json=PATH for --json_path=PATH
    configure(globals(), [a.replace('--json=', '--json_path=', 1) if a.startswith('--json=') else
                          a + '=True' if a == '--quick' else a for a in sys.argv[1:]])
except ConfigError as e:
    fail(e)
config = {k: globals()[k] for k in config_keys}  # as given, before 'auto' and 0 are resolved below
device = device if device != 'auto' else 'cuda' if torch.cuda.is_available() else 'cpu'
on_gpu = torch.device(device).type == 'cuda'
dtype = dtype if dtype != 'auto' else 'bfloat16' if on_gpu else 'float32'
SECTIONS = ('attention', 'optimizer', 'train', 'memory', 'inference')
for key, value, choices in (('sections', sections, SECTIONS), ('train_configs', train_configs, ('paper', 'cpu')),
                            ('dtype', dtype, ('float32', 'bfloat16', 'float16'))):
    if not set(value.split(',')) <= set(choices):
        fail(f"{key}={value!r}: choose from {','.join(choices)}")
wanted, configs_wanted, ptdtype = sections.split(','), train_configs.split(','), getattr(torch, dtype)
if threads or quick:  # toy-sized ops gain nothing from more threads, and lose much when other processes share the cores
    torch.set_num_threads(threads or 1)
if on_gpu:
    torch.cuda.set_device(torch.device(device).index or 0)  # CUDA events and memory stats go to the current device
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py
PEAK_TFLOPS = peak_tflops(torch.cuda.get_device_name()) if on_gpu and ptdtype != torch.float32 else None
MEMORY = 'memory in GiB: peak allocated, reserved' if on_gpu else "memory in GiB: the process's peak RSS so far"
if json_path:
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
sys.stdout.reconfigure(line_buffering=True)  # each row shows as it finishes, also into a pipe
failures = []  # rows that failed for a reason other than memory: the exit code is then 1


def size(value, gpu, cpu, toy):  # a config value, or where it is left at 0 the size for this run
    return value or (toy if quick else gpu if on_gpu else cpu)


# the settings and models as train.py would run them: its config block run on its own (importing train.py would
# start a run) is the paper recipe; the CPU config is cpu_config applied to it by configurator.py, as train.py does
root = os.path.dirname(os.path.abspath(__file__))
scope = dict(fields=fields, HRMConfig=HRMConfig)  # the block's names from train.py's imports
exec(open(os.path.join(root, 'train.py')).read().split('\n# ' + '-' * 77 + '\n')[1], scope)
SETTINGS = {'paper': {k: v for k, v in scope.items() if isinstance(v, (int, float, bool, str))}}
SETTINGS['cpu'] = dict(SETTINGS['paper'])
try:
    configure(SETTINGS['cpu'], [cpu_config if os.path.exists(cpu_config) else os.path.join(root, cpu_config)])
    MODELS = {name: HRMConfig(**{f.name: s[f.name] for f in fields(HRMConfig)}) for name, s in SETTINGS.items()}
except (ConfigError, ValueError, TypeError) as e:
    fail(f"cpu_config={cpu_config!r}: {e}")
if quick:  # every code path of the paper model (Q head, Q target) at toy sizes, no real compute
    MODELS = {name: replace(model_config, hidden_size=32, num_heads=2, expansion=2.0, H_layers=1, L_layers=1,
                            H_cycles=2, L_cycles=2, halt_max_steps=3) for name, model_config in MODELS.items()}
BATCH = dict(paper=size(paper_batch, 768, 8, 4),
             cpu=cpu_batch or (4 if quick else SETTINGS['cpu']['global_batch_size']))
repeats, max_seconds, segments = size(repeats, 20, 3, 1), size(max_seconds, 3.0, 30.0, 5.0), size(segments, 16, 16, 2)

# -----------------------------------------------------------------------------
# measuring


def measure(fn, inner=1, puzzles=0, tflop=0.0):
    """The first call on its own (for compiled code mostly compilation), then up to `repeats` timings of `inner` calls
    each, stopping after max_seconds, and given a call's `puzzles` and `tflop`, the rates at the median. On GPU a
    timing runs from an idle device to the end of the calls' work, between CUDA events: no host sync per call."""
    def ms_per_call(calls):
        if on_gpu:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if on_gpu:
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / calls
        return 1000 * (time.perf_counter() - t0) / calls
    first_s = ms_per_call(1) / 1000
    times, deadline = [], time.perf_counter() + max_seconds
    while len(times) < repeats and (not times or time.perf_counter() < deadline):
        times.append(ms_per_call(inner))
    row = dict(min_ms=min(times), median_ms=statistics.median(times), repeats=len(times), first_s=first_s)
    if puzzles:
        seconds = row['median_ms'] / 1000
        row.update(puzzles_per_s=puzzles / seconds, tflops=tflop / seconds,
                   mfu=PEAK_TFLOPS and tflop / seconds / PEAK_TFLOPS)
    return row


def reset_memory():  # free what earlier rows left, so that the next GPU peak starts from a clean baseline
    torch._dynamo.reset()  # compiled code can hold on to the model it was compiled for
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_row(what, fn):
    """fn() -> a row's dict. A row that fails becomes {'failed': 'OOM'} or {'failed': 'error: ...'} and the run
    goes on: a GPU run is minutes one should not lose to one row."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        # CUDA's OutOfMemoryError, or another allocator's RuntimeError (cuBLAS, Triton, the CPU's)
        if isinstance(e, torch.cuda.OutOfMemoryError) or 'out of memory' in str(e) or "can't allocate memory" in str(e):
            failed = 'OOM'
        else:
            traceback.print_exc()
            failed = f"error: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            failures.append(f"{what}: {failed}")
    reset_memory()  # out of the except block, where the traceback no longer holds the row's tensors
    return dict(failed=failed)


def triton_problem(head_dim):  # why this run has no Triton rows at this head_dim, or None
    return (triton_attention_problem(head_dim, ptdtype, torch.device(device)) if on_gpu else
            "on CPU the Triton kernel runs only in its interpreter, a correctness tool, not a speed measure")


def describe(row):
    """One row as a line: ms per call, min / median, then the rates, MFU and peak memory where it has them."""
    if 'failed' in row:
        return row['failed']
    text = f"{row['min_ms']:9.2f} / {row['median_ms']:9.2f} ms"
    for key, scale, unit in (('puzzles_per_s', 1, 'puzzles/s'), ('tflops', 1, 'TFLOP/s'), ('mfu', 100, '% MFU'),
                             ('peak_memory_bytes', 2**-30, 'GiB'), ('peak_reserved_bytes', 2**-30, 'GiB reserved')):
        text += '' if row.get(key) is None else f" {row[key] * scale:9.5g} {unit}"
    return text + f", first call {row['first_s']:.1f} s"


# -----------------------------------------------------------------------------
# the sections; each prints its rows and returns its JSON record


def bench_attention():
    B, S, H, D = size(attn_batch, 768, 32, 2), 82, 8, 64
    # q, k, v are views of one fused qkv tensor, as the model's qkv projection hands them over
    qkv = torch.randn(B, S, 3, H, D, device=device, dtype=ptdtype)
    grad_out = torch.randn(B, S, H, D, device=device, dtype=ptdtype)
    print(f"attention  B={B} S={S} H={H} D={D} {dtype}, per call: forward (no grad) | forward+backward")
    impls = dict(triton=fused_attention, sdpa=sdpa_attention, reference=attention_reference)
    if triton_problem(D):
        print(f"  triton     skipped: {triton_problem(D)}")
        del impls['triton']
    inner, rows = 10 if on_gpu else 1, []  # calls of ~0.1 ms on a GPU: one event pair per 10
    for name, attend in impls.items():
        for mask_name, mask in (('none', None), ('sudoku', sudoku_attention_mask().to(device))):
            def forward():
                with torch.no_grad():
                    attend(*qkv.unbind(2), mask)

            def forward_backward():
                leaf = qkv.detach().requires_grad_()
                torch.autograd.grad(attend(*leaf.unbind(2), mask), leaf, grad_out)
            row = run_row(f"attention {name} {mask_name}", lambda: dict(
                forward=measure(forward, inner), forward_backward=measure(forward_backward, inner)))
            rows.append(dict(impl=name, mask=mask_name, **row))
            print(f"  {name:10s} {mask_name:7s} "
                  + (row.get('failed') or f"{describe(row['forward'])} | {describe(row['forward_backward'])}"))
    return dict(shape=dict(batch=B, seq=S, heads=H, head_dim=D), results=rows)


def bench_optimizer():
    model_config, settings = MODELS['paper'], SETTINGS['paper']
    shapes = [p.shape for n, p in HRM(model_config).named_parameters() if n != 'puzzle_emb']
    numel = sum(s.numel() for s in shapes)
    print(f"optimizer  AdamATan2 step, {numel / 1e6:.2f}M fp32 params in {len(shapes)} tensors")
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
        print(f"  foreach={str(foreach):5s} {describe(rows[-1])}")
    speedup = None if any('failed' in r for r in rows) else rows[1]['median_ms'] / rows[0]['median_ms']
    if speedup:
        print(f"  foreach speedup {speedup:.2f}x")
    return dict(params=numel, tensors=len(shapes), results=rows, foreach_speedup=speedup)


def train_row(name, batch, variant, accumulation=1):
    """The training step as train.py runs it, on random puzzles (its speed does not depend on them): a fresh model in
    `variant` ('eager+sdpa', ...), its optimizers, then steps of `accumulation` micro-batches, each with its carry."""
    model_config, settings, (compiled, attn_impl) = MODELS[name], SETTINGS[name], variant.split('+')
    reset_memory()
    torch.manual_seed(seed)
    model = HRM(replace(model_config, attn_impl=attn_impl), dtype=ptdtype).to(device)
    optimizer = AdamATan2([p for n, p in model.named_parameters() if n != 'puzzle_emb'], lr=settings['lr'],
                          betas=(settings['beta1'], settings['beta2']), weight_decay=settings['weight_decay'],
                          foreach=on_gpu)  # as train.py: per-tensor is the faster on CPU
    emb_optimizer = SignSGD([model.puzzle_emb], lr=settings['puzzle_emb_lr'],
                            weight_decay=settings['puzzle_emb_weight_decay'])
    forward = torch.compile(model) if compiled == 'compiled' else model
    micro_batch = batch // accumulation
    carries = [model.initial_carry(micro_batch, device) for _ in range(accumulation)]
    generator, sums = torch.Generator(device=device).manual_seed(seed), {}

    def step():  # get_batch, less the dataset and augmentation, then train.py's loop body
        puzzles = torch.randint(0, 10, (batch, 81), device=device, dtype=torch.uint8, generator=generator)  # 0 = blank
        solutions = torch.randint(1, 10, (batch, 81), device=device, dtype=torch.uint8, generator=generator)
        min_halt = model.exploration_draw(batch, device, generator) if model_config.act == 'q' else None
        for micro in range(accumulation):
            s = slice(micro * micro_batch, (micro + 1) * micro_batch)
            carries[micro], outputs = forward(carries[micro], puzzles[s], solutions[s],
                                              None if min_halt is None else min_halt[s])
            loss, metrics = model.loss(carries[micro], outputs)
            (loss / batch).backward()
            metrics['loss'] = loss.detach()
            for k, v in metrics.items():  # summed on the device as train.py does: no host sync
                sums[k] = sums.get(k, 0) + v
        optimizer.step()
        emb_optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        emb_optimizer.zero_grad(set_to_none=True)
    tflop = flops_per_step(model_config, batch) / 1e12
    result = measure(step, puzzles=batch, tflop=tflop)
    # on GPU since reset_memory(), weights and optimizer state included; on CPU the process's peak RSS, which cannot
    # be reset: the largest of this row's and those before it (kB on Linux, bytes on macOS)
    peak = (torch.cuda.max_memory_allocated() if on_gpu else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == 'darwin' else 1024))
    return dict(**result, tflop_per_step=tflop, peak_memory_bytes=peak,
                peak_reserved_bytes=torch.cuda.max_memory_reserved() if on_gpu else None)


def bench_train():
    print(f"train step  random puzzles, {dtype}, {MEMORY}")
    rows, notes = [], [] if on_gpu or cpu_compile else ["no compiled+sdpa rows: --cpu_compile=True times them"]
    for name in configs_wanted:
        model_config, batch = MODELS[name], BATCH[name]
        problem = triton_problem(model_config.hidden_size // model_config.num_heads)
        notes += [f"no triton rows: {problem}"] if problem else []
        for variant in ['eager+sdpa'] + (['eager+triton', 'compiled+triton'] if not problem else
                                         ['compiled+sdpa'] if cpu_compile and not on_gpu else []):
            row = run_row(f"train {name} {variant}", lambda: train_row(name, batch, variant))
            rows.append(dict(config=name, variant=variant, batch=batch, **row))
            print(f"  {name:5s} {variant:15s} batch {batch:4d} {describe(row)}")
    notes = list(dict.fromkeys(notes))  # on CPU both configs give the same reason
    print(''.join(f"  note: {note}\n" for note in notes), end='')
    return dict(results=rows, notes=notes, models={name: asdict(MODELS[name]) for name in configs_wanted})


def bench_memory():
    # the question is what fits on a GPU: the paper recipe's global batch there; on CPU the CPU config's
    name = 'paper' if on_gpu else 'cpu'
    model_config, batch = MODELS[name], BATCH[name]
    variant = (('compiled' if accum_compile else 'eager')  # and the attention that attn_impl='auto' picks
               + ('+sdpa' if triton_problem(model_config.hidden_size // model_config.num_heads) else '+triton'))
    print(f"memory  {name} config, global batch {batch} in micro-batches, {variant}, {dtype}, {MEMORY}")
    rows = []
    for accumulation in [int(a) for a in accum_splits.split(',') if batch % int(a) == 0]:
        row = run_row(f"memory {accumulation} micro-batches", lambda: train_row(name, batch, variant, accumulation))
        rows.append(dict(micro_batch=batch // accumulation, accumulation=accumulation, **row))
        print(f"  {f'{batch // accumulation} x {accumulation}':>10s} {describe(row)}")
    return dict(config=name, global_batch=batch, variant=variant, results=rows)


def single_puzzle():
    """One puzzle as sample.py solves it by default (its views and check; ACT halting, or the run's eval_segments
    without a Q head): load_checkpoint, then solve, in this process. `time python sample.py` adds the interpreter's
    and the imports' start-up, seconds on a CPU."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(sample_out_dir or tmp, 'ckpt.pt')
        if not sample_out_dir:  # what train.py saves, less the optimizer and data-order state sample.py never reads
            torch.manual_seed(seed)
            torch.save({'model': HRM(MODELS['cpu']).state_dict(), 'ema': None,
                        'config': {**SETTINGS['cpu'], **asdict(MODELS['cpu'])}}, path)
        load = measure(lambda: load_checkpoint(path, device, dtype=ptdtype))
        model, run_config = load_checkpoint(path, device, dtype=ptdtype)
    act = model.config.act == 'q'
    puzzle = torch.from_numpy(sudoku.parse_grid(sample.EXAMPLE))[None].to(device)  # (1, 81) cells, 0 = blank
    generator = torch.Generator(device=device).manual_seed(seed)
    solve = measure(lambda: model.solve(puzzle, segments=None if act else run_config.get('eval_segments') or None,
                                        halt=act, views=sample.views, check=sample.check, generator=generator))
    summary = (f"{sample_out_dir or 'a random-init CPU-model checkpoint'}, sample.py's views={sample.views} "
               f"check={sample.check} {'with ACT halting' if act else 'at its eval_segments'}: load "
               f"{load['median_ms']:.1f} ms + solve {solve['median_ms']:.1f} ms (medians)")
    return dict(summary=summary, load=load, solve=solve)


def bench_inference():
    print(f"inference  HRM.solve, {segments} segments, random puzzles; views=8 solves 1/8 the puzzles: the same rows")
    rows = []
    for name in configs_wanted:
        model_config = MODELS[name]
        torch.manual_seed(seed)
        model = HRM(model_config, dtype=ptdtype).to(device).eval()
        for views in (1, 8):
            batch = max(1, size(infer_batch, 768, 1 if name == 'paper' else 32, 8) // views)
            puzzles = torch.randint(0, 10, (batch, 81), device=device)  # cells, 0 = blank
            tflop = flops_per_step(model_config, batch * views, training=False) * segments / 1e12
            row = run_row(f"inference {name} views={views}", lambda: dict(**measure(
                lambda: model.solve(puzzles, segments=segments, views=views), puzzles=batch, tflop=tflop),
                tflop_per_solve=tflop))
            rows.append(dict(config=name, views=views, batch=batch, segments=segments, **row))
            print(f"  {name:5s} views={views} batch {batch:4d} {describe(row)}")
    single = run_row("inference single puzzle", single_puzzle)
    print(f"  single puzzle: {single.get('failed') or single['summary']}")
    return dict(batch=rows, single_puzzle=single)


# -----------------------------------------------------------------------------
t_start = time.time()
environment = dict(date=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), command=' '.join(['python', *sys.argv]),
                   device=device, dtype=dtype, gpu=on_gpu and torch.cuda.get_device_name() or None,
                   gpu_memory_gib=on_gpu and round(torch.cuda.get_device_properties().total_memory / 2**30, 1) or None,
                   peak_tflops=PEAK_TFLOPS, cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                   torch_threads=torch.get_num_threads(), platform=platform.platform(), torch=torch.__version__,
                   python=platform.python_version(), cuda=torch.version.cuda,
                   triton=getattr(sys.modules.get('triton'), '__version__', None))
paper_tflop = flops_per_step(HRMConfig(), 768) / 1e12
record = dict(environment=environment, config=config, load_average_before=os.getloadavg(),
              paper_tflop_per_step_at_768=paper_tflop)
print(f"== nanoHRM bench{' --quick' if quick else ''} | {environment['gpu'] or environment['cpu']} | {device} {dtype} "
      f"| torch {torch.__version__} | triton {environment['triton']} | {os.cpu_count()} CPUs, "
      f"{torch.get_num_threads()} threads | {environment['date']} | load average {record['load_average_before']} ==")
print(f"paper config at batch 768: {paper_tflop:.2f} TFLOP per training step (analytic, flops_per_step)")
for section, bench in dict(attention=bench_attention, optimizer=bench_optimizer, train=bench_train,
                           memory=bench_memory, inference=bench_inference).items():
    if section in wanted:
        t0 = time.time()
        record[section] = run_row(section, bench)  # a section that fails still leaves the others
        record[section]['section_s'] = time.time() - t0
        print(f"  [{section}: {record[section].get('failed', 'done')}, {record[section]['section_s']:.0f} s]")
        reset_memory()
        # the whole record after every section, so that a run cut short (a lease that ends) keeps what it measured
        record.update(load_average_after=os.getloadavg(), runtime_s=time.time() - t_start, failures=failures)
        if json_path:
            with open(json_path, 'w') as f:
                json.dump(record, f, indent=1)
print(f"load average after {record['load_average_after']} | {record['runtime_s']:.0f} s in all"
      + (f" | wrote {json_path}" if json_path else ''))
if failures:
    print(f"{len(failures)} row(s) failed:\n  " + '\n  '.join(failures), file=sys.stderr)
    sys.exit(1)
