"""
Train HRM on Sudoku. One process (GPU, CPU or Apple mps):
    python train.py config/sudoku_1gpu.py
    python train.py config/sudoku_cpu.py --max_minutes=5
DDP on one node (NCCL on GPUs, gloo on CPU):
    torchrun --standalone --nproc_per_node=8 train.py
DDP over nodes: run on each node (rank 0 at 123.456.123.456)
    torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=123.456.123.456 --master_port=1234 train.py
The defaults below are the paper's 8-GPU Sudoku-Extreme recipe.
"""

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import prepare_sudoku as sudoku
from configurator import ConfigError, configure, fail
from model import HRM, HRMConfig, flops_per_step, load_checkpoint, peak_tflops
from optim import AdamATan2, SignSGD

# -----------------------------------------------------------------------------
# default config values: the paper's 8-GPU Sudoku-Extreme recipe
# I/O
out_dir = 'out-sudoku'
data_dir = 'data/sudoku-extreme-1k'
prepare_args = ''           # if data_dir is missing: python prepare_sudoku.py {prepare_args} --out_dir={data_dir}
init_from = 'scratch'       # 'scratch' or 'resume' (from out_dir/ckpt.pt)
log_interval = 10           # steps between log lines (and between stop/time checks)
eval_interval = 2000.0      # epochs between evals (and checkpoints); fractions allowed
eval_max_puzzles = 0        # evaluate on the first N test puzzles (0 = all)
eval_segments = 0           # segments run per test puzzle (0 = halt_max_steps, as the paper)
eval_views = 1              # > 1: also report exact_acc_ttc, with this many symmetric views per puzzle
eval_check = False          # also report exact_acc_ttc, each puzzle stopping at the first answer that checks
eval_restart = 0            # also report exact_acc_ttc, a view not checking after this many segments starting over
eval_hints = 0              # with eval_restart: a restarted view keeps this many of its surest cells as givens
eval_only = False           # evaluate out_dir/ckpt.pt on the full test set, print the breakdown, exit
target_exact_acc = 0.0      # stop early once eval exact accuracy reaches this (0 = never)
max_minutes = 0.0           # stop so that the run, its final eval included, ends within this much wall time (0 = off)
wandb_log = False
wandb_project = 'nanohrm'
wandb_run_name = 'hrm-sudoku'
# data
global_batch_size = 768     # puzzles per step over all processes
gradient_accumulation_steps = 1  # micro-batches per process per step, each with its own ACT carry
epochs = 20000              # one epoch = one pass over the training puzzles
max_iters = 0               # total steps; 0 = epochs * train puzzles / global_batch_size
augment = True              # a random Sudoku symmetry per puzzle per draw
curriculum_givens = 0       # > 17: training puzzles start filled in from their solutions to this many givens, a
curriculum_frac = 0.5       # minimum that falls linearly to 17 (the puzzles as given) over this fraction of max_steps,
curriculum_pace = 0.0       # or, if > 0, by one after each log interval whose train exact accuracy reaches this
# optimizer (AdamATan2 for the network, sign-SGD for the puzzle embedding, as the reference)
lr = 1e-4
puzzle_emb_lr = 1e-4
weight_decay = 1.0
puzzle_emb_weight_decay = 1.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 0.0             # 0 = off (the reference does not clip)
warmup_iters = 2000
lr_min_ratio = 1.0          # cosine decay to lr * lr_min_ratio; 1.0 = constant after warmup
ema = 0.0                   # decay of an EMA of the weights used for eval and saved checkpoints (0 = off)
# system
seed = 0
device = 'auto'             # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'              # 'auto' (bfloat16 on CUDA, float32 elsewhere), 'bfloat16', 'float16', 'float32'
compile = True              # torch.compile the training step (CUDA or CPU: 1.09x on the hard CPU config over an hour)
# model: every HRMConfig field is a config key too, with the defaults from model.py
model_keys = [f.name for f in fields(HRMConfig)]
globals().update({f.name: f.default for f in fields(HRMConfig)})
# -----------------------------------------------------------------------------


t_start = time.time()  # wall time counts from here: dataset generation and start-up are part of time-to-accuracy


config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
try:
    configure(globals(), sys.argv[1:])
except ConfigError as e:
    fail(str(e))
config = {k: globals()[k] for k in config_keys}

# distributed setup -------------------------------------------------------------
ddp = int(os.environ.get('RANK', -1)) != -1
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
if ddp:
    rank, local_rank, world_size = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    else:  # CPU ranks on one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get('LOCAL_WORLD_SIZE', world_size))))
else:
    rank, local_rank, world_size = 0, 0, 1
master_process = rank == 0
try:  # an unknown or unavailable device fails here in one line, not deep inside model creation
    torch.empty(0, device=device)
except (RuntimeError, AssertionError) as e:
    fail(f"device={device!r} is not usable: {e}")
device_type = 'cuda' if device.startswith('cuda') else device
if dtype == 'auto':
    dtype = 'bfloat16' if device_type == 'cuda' else 'float32'
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}.get(dtype)
if ptdtype is None:
    fail(f"dtype={dtype!r} is not one of auto, float32, bfloat16, float16")
if ptdtype == torch.float16:  # its 5-bit exponent underflows small gradients unless the loss is scaled
    fail("dtype='float16' needs loss scaling, which train.py does not do: use bfloat16 (or float32)")
if eval_views < 1 or eval_restart < 0 or eval_hints < 0:
    fail(f"eval_views={eval_views} must be >= 1, eval_restart={eval_restart} and eval_hints={eval_hints} >= 0")
if eval_hints and not eval_restart:
    fail("eval_hints are kept when a view restarts: set eval_restart too")
if not (0 <= curriculum_givens <= 81 and 0 < curriculum_frac <= 1 and 0 <= curriculum_pace <= 1):
    fail(f"curriculum_givens={curriculum_givens} must be in 0..81, curriculum_frac={curriculum_frac} in (0, 1] "
         f"and curriculum_pace={curriculum_pace} in [0, 1]")
if global_batch_size % (world_size * gradient_accumulation_steps):
    fail(f"global_batch_size={global_batch_size} is not divisible by world_size*gradient_accumulation_steps="
         f"{world_size * gradient_accumulation_steps}")
micro_batch = global_batch_size // (world_size * gradient_accumulation_steps)
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
torch.manual_seed(seed)
if master_process:
    os.makedirs(out_dir, exist_ok=True)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')

# data ----------------------------------------------------------------------------
if not os.path.exists(os.path.join(data_dir, 'train.bin')) and not eval_only:
    if not prepare_args:
        fail(f"no dataset in {data_dir}: make it with  python prepare_sudoku.py --out_dir={data_dir}  "
             f"(add --source=DIR for local Sudoku-Extreme CSVs, or --source=generate to work offline)")
    if master_process:
        # next to this file, so a run started from another directory (e.g. for wandb's files) finds it
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'prepare_sudoku.py')
        command = [sys.executable, script, *prepare_args.split(), f'--out_dir={data_dir}']
        print('data missing, generating it:', ' '.join(command[1:]))
        if subprocess.run(command).returncode != 0:
            fail(f"dataset generation failed: {' '.join(command[1:])}", code=1)
    if ddp:
        dist.barrier()
try:
    test_rows = sudoku.read_split(data_dir, 'test')
    test_ratings = sudoku.read_ratings(data_dir, 'test')
    train_rows = None if eval_only else torch.from_numpy(np.array(sudoku.read_split(data_dir, 'train'))).to(device)
except (FileNotFoundError, ValueError) as e:
    fail(str(e))
n_train = 0 if eval_only else len(train_rows)
steps_per_epoch = n_train / global_batch_size
max_steps = max_iters or int(epochs * steps_per_epoch)
eval_every = max(1, round(eval_interval * steps_per_epoch))

# The batch order: a fresh permutation of the training puzzles each epoch, drawn on the host by a
# seeded generator whose state is checkpointed, so a resumed run draws the same batches.
order_rng = np.random.default_rng(seed)
order, cursor = np.zeros(0, dtype=np.int64), 0
# Augmentation and ACT exploration draw from one device generator, also checkpointed.
device_rng = torch.Generator(device=device).manual_seed(seed + 1)


def next_indices(n):
    global order, cursor
    parts = []
    while n > 0:
        if cursor == len(order):
            order, cursor = order_rng.permutation(n_train), 0
        take = min(n, len(order) - cursor)
        parts.append(order[cursor:cursor + take])
        cursor, n = cursor + take, n - take
    return np.concatenate(parts)


paced_givens = curriculum_givens  # the paced curriculum's minimum (checkpointed)


def curriculum_min_givens(it):
    """The curriculum's minimum givens at step it; 17 or less leaves the puzzles as they are."""
    if curriculum_givens <= 17 or curriculum_pace > 0:
        return paced_givens
    progress = min(1.0, it / max(1.0, curriculum_frac * max_steps))
    return round(curriculum_givens - (curriculum_givens - 17) * progress)


def get_batch(it):
    """This process's micro-batches of one global batch at step it: a list of (puzzles, solutions, min_halt_steps).
    Every process draws and augments the whole global batch and keeps its slice, so the run is the
    same whatever the number of processes (the draw is tiny next to the model)."""
    index = torch.from_numpy(next_indices(global_batch_size))
    if device_type == 'cuda':  # from pinned memory the copy is asynchronous: the host does not wait for the GPU
        index = index.pin_memory()
    rows = train_rows[index.to(device, non_blocking=True)]
    puzzles, solutions = rows[:, :81], rows[:, 81:]
    if augment:
        puzzles, solutions = sudoku.augment(puzzles, solutions, generator=device_rng)
    if curriculum_min_givens(it) > 17:  # (no draw otherwise: without a curriculum the random streams are unchanged)
        puzzles = sudoku.reveal(puzzles, solutions, curriculum_min_givens(it), generator=device_rng)
    min_halt = raw_model.exploration_draw(global_batch_size, device, device_rng) if model_config.act == 'q' else None
    batches = []
    for micro in range(gradient_accumulation_steps):
        first = (rank * gradient_accumulation_steps + micro) * micro_batch
        s = slice(first, first + micro_batch)
        batches.append((puzzles[s], solutions[s], None if min_halt is None else min_halt[s]))
    return batches


# model and optimizers ----------------------------------------------------------------
checkpoint = None
if eval_only:  # the run's architecture and the weights its evals scored (the EMA, when it kept one)
    try:
        model, _ = load_checkpoint(ckpt_path, device, ptdtype)
    except ValueError as e:
        fail(str(e))
elif init_from == 'resume':
    if not os.path.exists(ckpt_path):
        fail(f"no checkpoint at {ckpt_path} to resume")
    # onto the CPU: the RNG states must stay there (torch.set_rng_state takes only a CPU tensor), and the
    # model, optimizer and carry are moved to the device as they are loaded below
    checkpoint = torch.load(ckpt_path, map_location='cpu', weights_only=False)
    for k in model_keys:  # the architecture comes from the checkpoint (a key newer than it: the default it ran with)
        config[k] = checkpoint['config'].get(k, HRMConfig.__dataclass_fields__[k].default)
elif init_from != 'scratch':
    fail(f"init_from={init_from!r} is not 'scratch' or 'resume'")
if not eval_only:
    try:
        model = HRM(HRMConfig(**{k: config[k] for k in model_keys}), dtype=ptdtype).to(device)
    except (ValueError, RuntimeError) as e:
        fail(str(e))
    if checkpoint is not None:
        model.load_state_dict(checkpoint['model'])
raw_model, model_config = model, model.config
network_params = [p for n, p in model.named_parameters() if n != 'puzzle_emb']
# foreach (multi-tensor) kernels pay off on CUDA; on CPU the per-tensor loop is faster (bench.py)
optimizer = AdamATan2(network_params, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay,
                      foreach=device_type == 'cuda')
emb_optimizer = SignSGD([model.puzzle_emb], lr=puzzle_emb_lr, weight_decay=puzzle_emb_weight_decay)
ema_params = [p.detach().float().clone() for p in model.parameters()] if ema > 0 and not eval_only else None

step, best_exact, elapsed_before, puzzles_seen, eval_s = 0, 0.0, 0.0, 0, 0.0  # eval_s: how long the last eval took
carries = [model.initial_carry(micro_batch, device) for _ in range(gradient_accumulation_steps)]
if checkpoint is not None:
    if ema_params is not None and checkpoint.get('ema') is not None:
        ema_params = [t.to(device) for t in checkpoint['ema']]
    optimizer.load_state_dict(checkpoint['optimizer'])
    emb_optimizer.load_state_dict(checkpoint['emb_optimizer'])
    step, best_exact = checkpoint['step'], checkpoint['best_exact']
    elapsed_before, puzzles_seen = checkpoint['elapsed'], checkpoint['puzzles_seen']
    eval_s = checkpoint.get('eval_s', 0.0)  # older checkpoints lack it
    paced_givens = checkpoint.get('paced_givens', curriculum_givens)
    order_rng.bit_generator.state = checkpoint['order_rng']
    order, cursor = checkpoint['order'], checkpoint['cursor']
    device_rng.set_state(checkpoint['device_rng'].cpu())
    torch.set_rng_state(checkpoint['cpu_rng'])
    saved = checkpoint['carry']  # the global carry; slice out this process's rows
    if saved.z_H.shape[0] != global_batch_size:
        fail(f"the checkpoint's batch is {saved.z_H.shape[0]} puzzles, this run's global_batch_size is "
             f"{global_batch_size}")
    for micro in range(gradient_accumulation_steps):
        first = (rank * gradient_accumulation_steps + micro) * micro_batch
        carries[micro] = type(saved)(*(t[first:first + micro_batch].to(device) for t in saved))
    if master_process:
        print(f"resumed from {ckpt_path} at step {step}")
checkpoint = None  # free memory

try:  # forcing the kernel where it cannot run (attn_impl='triton' with fp32 on CUDA, say) is a one-line error
    uses_triton = model.uses_triton(torch.device(device))
except (ValueError, RuntimeError) as e:
    fail(str(e))
if compile and device_type != 'mps' and not eval_only:  # inductor's mps backend is young and untested here
    if device_type == 'cpu' and not any(map(shutil.which, (os.environ.get('CXX', 'g++'), 'g++', 'clang++'))):
        fail("compile=True on CPU needs a C++ compiler (g++ or clang++): install one or pass --compile=False")
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)


def get_lr(it, base_lr):
    """Linear warmup from 0, then cosine from base_lr down to base_lr * lr_min_ratio (the reference's
    schedule; with lr_min_ratio = 1 it is constant after warmup)."""
    if it < warmup_iters:
        return base_lr * it / warmup_iters
    progress = (it - warmup_iters) / max(1, max_steps - warmup_iters)
    return base_lr * (lr_min_ratio + (1 - lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@contextmanager
def ema_weights():
    """Evaluate and save with the EMA weights when ema > 0, then put the trained weights back."""
    if ema_params is None:
        yield
        return
    params = [p.detach() for p in raw_model.parameters()]  # detached views: copied into in place
    backup = [p.clone() for p in params]
    torch._foreach_copy_(params, ema_params)
    try:
        yield
    finally:
        torch._foreach_copy_(params, backup)


FAILURES_MAX = 1000  # wrong answers written to out_dir/eval_failures.csv per eval: enough to study, small on disk


def text(grid):
    return sudoku.grid_to_string(grid.cpu().numpy())


@torch.no_grad()
def evaluate(max_puzzles, failures_path=None):
    """Exact accuracy (all 81 cells right), cell accuracy, mean segments and Q-halt accuracy on the
    test split, overall and per difficulty bin; test puzzles are sharded over the processes.
    The paper's metric (`exact_acc`) is always the puzzle as given, a fixed eval_segments, no check.
    With eval_views > 1, eval_check or eval_restart, a second solve adds the test-time-compute metric
    (`exact_acc_ttc`): eval_views symmetric views, up to eval_segments, stopping at the first answer that checks."""
    raw_model.eval()
    n = len(test_rows) if not max_puzzles else min(max_puzzles, len(test_rows))
    mine = np.arange(rank, n, world_size)
    ttc = eval_views > 1 or eval_check or eval_restart > 0
    generator = torch.Generator(device=device).manual_seed(seed + 2)  # the same views at every eval
    bins = {'rating': sudoku.RATING_BINS, 'givens': sudoku.GIVENS_BINS}
    metrics = ['exact', 'exact_ttc'] if ttc else ['exact']
    # sums of per-puzzle numbers, one dict key each, so every process holds the same keys for the all-reduce
    per_bin = [f'{key}/{name}/{m}' for key, bin_list in bins.items() for _, _, name in bin_list
               for m in ['count'] + metrics]
    sums = dict.fromkeys(['exact', 'cells', 'steps', 'q_right', 'exact_ttc', 'steps_ttc', 'seconds_ttc'] + per_bin, 0.0)
    failures = []
    batch = micro_batch
    for start in range(0, len(mine), batch):
        idx = mine[start:start + batch]
        rows = torch.from_numpy(np.array(test_rows[idx])).to(device)
        puzzles, solutions = rows[:, :81], rows[:, 81:].long()
        paper = raw_model.solve(puzzles, segments=eval_segments or None)
        cell_right = paper.grids == solutions
        exact = cell_right.all(-1)
        per_puzzle = {'exact': exact.cpu().numpy()}
        sums['exact'] += float(exact.sum())
        sums['cells'] += float(cell_right.float().mean(-1).sum())
        sums['steps'] += float(paper.steps.sum())
        if paper.q_halt is not None:
            sums['q_right'] += float(((paper.q_halt >= 0) == exact).sum())
        if ttc:
            if device_type == 'cuda':
                torch.cuda.synchronize(device)
            t0 = time.time()
            answer = raw_model.solve(puzzles, segments=eval_segments or None, views=eval_views, check=eval_check,
                                     restart=eval_restart, hints=eval_hints, generator=generator)
            exact_ttc = (answer.grids == solutions).all(-1).cpu().numpy()  # (a sync, so the clock is fair)
            sums['seconds_ttc'] += time.time() - t0
            sums['exact_ttc'] += float(exact_ttc.sum())
            sums['steps_ttc'] += float(answer.steps.sum())
            per_puzzle['exact_ttc'] = exact_ttc
        ratings = np.asarray(test_ratings[idx]).astype(np.int64)
        givens = (puzzles > 0).sum(-1).cpu().numpy()
        for key, values in (('rating', ratings), ('givens', givens)):
            which = sudoku.bin_index(values, bins[key])
            for i, (_, _, name) in enumerate(bins[key]):
                sums[f'{key}/{name}/count'] += float((which == i).sum())
                for m in metrics:
                    sums[f'{key}/{name}/{m}'] += float(per_puzzle[m][which == i].sum())
        if failures_path and len(failures) < FAILURES_MAX:
            wrong = ~per_puzzle['exact'] | (~per_puzzle['exact_ttc'] if ttc else False)
            for j in np.flatnonzero(wrong)[:FAILURES_MAX - len(failures)]:
                cells = (~cell_right[j]).nonzero().flatten().tolist()
                failure = [text(rows[j, :81]), text(paper.grids[j]), text(rows[j, 81:]), int(ratings[j]),
                           int(givens[j]), len(cells), ' '.join(f'r{c // 9 + 1}c{c % 9 + 1}' for c in cells)]
                if ttc:
                    failure += [text(answer.grids[j]), int((answer.grids[j] != solutions[j]).sum())]
                failures.append(failure)
    if ddp:
        packed = torch.tensor([sums[k] for k in sums], dtype=torch.float64, device=device)
        dist.all_reduce(packed)
        sums = dict(zip(sums, packed.tolist()))
    raw_model.train()
    result = {'exact_acc': sums['exact'] / n, 'cell_acc': sums['cells'] / n, 'steps': sums['steps'] / n,
              'q_halt_acc': sums['q_right'] / n if model_config.act == 'q' else None, 'puzzles': n}
    if ttc:
        result.update(exact_acc_ttc=sums['exact_ttc'] / n, ttc_views=eval_views, ttc_check=eval_check,
                      ttc_restart=eval_restart, ttc_hints=eval_hints,
                      ttc_segments=eval_segments or model_config.halt_max_steps, ttc_steps=sums['steps_ttc'] / n,
                      ttc_puzzles_per_s=n / max(sums['seconds_ttc'] / world_size, 1e-9))
    for key, bin_list in bins.items():
        for _, _, name in bin_list:
            count = sums[f'{key}/{name}/count']
            for m in metrics if count else []:
                result[f'{m}_by_{key}/{name}'] = (sums[f'{key}/{name}/{m}'] / count, int(count))
    if failures_path and master_process:
        with open(failures_path + '.tmp', 'w', newline='') as f:
            writer = csv.writer(f)
            writer.writerow(['puzzle', 'prediction', 'solution', 'rating', 'givens', 'n_wrong', 'wrong_cells'] +
                            (['ttc_prediction', 'ttc_n_wrong'] if ttc else []))
            writer.writerows(failures)
        os.replace(failures_path + '.tmp', failures_path)
    return result


def print_breakdown(result):
    q_halt = 'n/a' if result['q_halt_acc'] is None else format(result['q_halt_acc'], '.2%')
    print(f"exact accuracy {result['exact_acc']:.2%} | cell accuracy {result['cell_acc']:.2%} | "
          f"segments {result['steps']:.1f} | q-halt accuracy {q_halt} | {result['puzzles']} puzzles")
    if 'exact_acc_ttc' in result:
        print(f"  test-time: exact accuracy {result['exact_acc_ttc']:.2%} with {result['ttc_views']} views, up to "
              f"{result['ttc_segments']} segments{', checked' if result['ttc_check'] else ''}"
              f"{', restarted every %d' % result['ttc_restart'] if result['ttc_restart'] else ''}"
              f"{' keeping %d hints' % result['ttc_hints'] if result['ttc_hints'] else ''} | mean segments run "
              f"{result['ttc_steps']:.1f} | {result['ttc_puzzles_per_s']:.3g} puzzles/s")
    for m, label in (('exact', ''), ('exact_ttc', 'test-time ')):
        for key in ('rating', 'givens'):
            parts = [(name.split('/')[1], value) for name, value in result.items() if name.startswith(f'{m}_by_{key}/')]
            if parts:
                print(f"  {label}by {key}:", ' | '.join(f"{name}: {acc:.1%} of {n}" for name, (acc, n) in parts))


def save_checkpoint():
    """Collective under DDP (the ACT carry is gathered from every process); only rank 0 writes.
    Written to a temporary file and renamed, so a crash mid-write leaves the previous one intact."""
    global_carry = []
    for field in zip(*carries):  # per carry field: this process's micro-batches, in row order
        local = torch.cat(field)
        if ddp:
            parts = [torch.empty_like(local) for _ in range(world_size)]
            dist.all_gather(parts, local)
            local = torch.cat(parts)
        global_carry.append(local.cpu())
    if not master_process:
        return
    state = {
        'model': raw_model.state_dict(), 'ema': None if ema_params is None else [t.cpu() for t in ema_params],
        'optimizer': optimizer.state_dict(), 'emb_optimizer': emb_optimizer.state_dict(), 'config': config,
        'step': step, 'best_exact': best_exact, 'elapsed': elapsed_before + time.time() - t_start,
        'puzzles_seen': puzzles_seen, 'eval_s': eval_s, 'paced_givens': paced_givens,
        'carry': type(carries[0])(*global_carry),
        'order_rng': order_rng.bit_generator.state, 'order': order, 'cursor': cursor,
        'device_rng': device_rng.get_state(), 'cpu_rng': torch.get_rng_state(),
    }
    torch.save(state, ckpt_path + '.tmp')
    os.replace(ckpt_path + '.tmp', ckpt_path)


def log_record(record):
    with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')
    if wandb_log:
        wandb.log({k: v[0] if isinstance(v, tuple) else v for k, v in record.items() if v is not None},
                  step=record['step'])


def finish(code):
    """Leave the process group together and exit. The barrier waits for rank 0's checkpoint write; dropping the
    DDP wrapper frees the backend work its reducer holds while the interpreter is whole. Even so a gloo rank can
    abort in its C++ teardown at interpreter exit ('terminate called without an active exception', seen in CI),
    so DDP ranks skip that teardown with os._exit once every file is written and the output flushed."""
    global model
    if ddp:
        dist.barrier()
        model = None
        dist.destroy_process_group()
        if 'wandb' in sys.modules:  # its run is otherwise flushed by an atexit hook, which os._exit skips
            sys.modules['wandb'].finish(exit_code=code)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if eval_only:
    # the full test split unless the command line itself caps it (config files cap in-training evals)
    cap = eval_max_puzzles if any(a.startswith('--eval_max_puzzles=') for a in sys.argv[1:]) else 0
    if master_process:
        print(f"evaluating {ckpt_path} on {min(cap, len(test_rows)) if cap else len(test_rows)} test puzzles")
    with ema_weights():
        result = evaluate(cap, os.path.join(out_dir, 'eval_failures.csv'))
    if master_process:
        print_breakdown(result)
    finish(0)

# signals: finish the current step, save, exit 0. A second signal interrupts at once (the last
# checkpoint on disk is always complete, thanks to the atomic rename).
stop_signal = None


def on_signal(signum, frame):
    global stop_signal
    if stop_signal is not None:
        raise KeyboardInterrupt
    stop_signal = signum


signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGTERM, on_signal)

if master_process:
    print(f"HRM: {raw_model.num_params() / 1e6:.2f}M parameters (+{raw_model.puzzle_emb.numel()} puzzle embedding) | "
          f"attention: {'Triton kernel' if uses_triton else 'PyTorch SDPA'} | device {device} {dtype} | "
          f"world {world_size} x accumulation {gradient_accumulation_steps} x micro-batch {micro_batch}")
    print(f"{n_train} training puzzles, {len(test_rows)} test | {max_steps} steps "
          f"({max_steps / max(steps_per_epoch, 1e-9):.0f} epochs) | "
          f"eval every {eval_every} steps")
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
        json.dump(config, f, indent=1)
    if wandb_log:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=config, resume='allow')

loss_scale = world_size / global_batch_size  # DDP averages over processes: the update is the global-batch mean
flops = flops_per_step(model_config, global_batch_size)
peak = peak_tflops(torch.cuda.get_device_name(device)) if device_type == 'cuda' and ptdtype != torch.float32 else None
window = {}  # metric sums since the last log line, on device
t_log, step_log = time.time(), step
exit_code, target_reached = 0, False
while step < max_steps:
    for group in optimizer.param_groups:
        group['lr'] = get_lr(step, lr)
    for group in emb_optimizer.param_groups:
        group['lr'] = get_lr(step, puzzle_emb_lr)
    for micro, (inputs, labels, min_halt) in enumerate(get_batch(step)):
        # under DDP, gradients are all-reduced only on the last micro-batch
        sync = nullcontext() if not ddp or micro == gradient_accumulation_steps - 1 else model.no_sync()
        with sync:
            carries[micro], outputs = model(carries[micro], inputs, labels, min_halt)
            loss, metrics = raw_model.loss(carries[micro], outputs)
            (loss * loss_scale).backward()
        metrics['loss'] = loss.detach()
        for k, v in metrics.items():
            window[k] = window.get(k, 0) + v
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(network_params, grad_clip)
    optimizer.step()
    emb_optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    emb_optimizer.zero_grad(set_to_none=True)
    if ema_params is not None:
        # the decay ramps up from 0 (as in TF's ExponentialMovingAverage) so early evals are not the init
        decay = min(ema, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema_params, [p.detach().float() for p in raw_model.parameters()], 1 - decay)
    step += 1

    last = step == max_steps
    if step % log_interval == 0 or last or step % eval_every == 0:
        # the one host sync per log interval: metric sums (all processes), stop requests, clock
        names = sorted(window)
        # the final eval will take about as long as the last one did
        late = max_minutes > 0 and (elapsed_before + time.time() - t_start + eval_s) / 60 > max_minutes
        packed = torch.stack([window[k].float() for k in names] + [
            torch.tensor(float(stop_signal is not None), device=device), torch.tensor(float(late), device=device)])
        if ddp:
            dist.all_reduce(packed)
        values = dict(zip(names, packed[:-2].tolist()))
        stop_requested, out_of_time = packed[-2].item() > 0, packed[-1].item() > 0
        window = {}
        window_steps = step - step_log
        dt = (time.time() - t_log) / window_steps
        t_log, step_log = time.time(), step
        count = max(values['count'], 1)
        puzzles_seen += int(values['count'])
        if not math.isfinite(values['loss']):
            if master_process:
                kept = (f"the last good checkpoint ({ckpt_path}) is untouched" if os.path.exists(ckpt_path)
                        else "no checkpoint was written")
                print(f"error: loss is {values['loss']} at step {step}; stopping, {kept}; try a lower lr"
                      f"{'' if dtype == 'float32' else ' or dtype=float32'}.", file=sys.stderr)
            exit_code = 1
            break
        record = {'step': step, 'epoch': step / steps_per_epoch, 'lr': get_lr(step - 1, lr),
                  'loss': values['loss'] / global_batch_size / window_steps,
                  'lm_loss': values['lm_loss'] / global_batch_size / window_steps,
                  'train_exact_acc': values['exact_acc'] / count, 'train_cell_acc': values['cell_acc'] / count,
                  'train_steps': values['steps'] / count, 'ms_per_step': 1000 * dt,
                  'puzzles_per_s': global_batch_size / dt,
                  'wall_s': elapsed_before + time.time() - t_start, 'puzzles_seen': puzzles_seen}
        if curriculum_givens > 17:
            record['curriculum_min_givens'] = curriculum_min_givens(step - 1)
            if curriculum_pace > 0 and record['train_exact_acc'] >= curriculum_pace:
                paced_givens = max(17, paced_givens - 1)
        if 'q_halt_loss' in values:
            record['q_halt_loss'] = values['q_halt_loss'] / global_batch_size / window_steps
            record['q_halt_acc'] = values['q_halt_acc'] / count
        if 'q_continue_loss' in values:
            record['q_continue_loss'] = values['q_continue_loss'] / global_batch_size / window_steps
        if peak:  # model FLOPs utilisation against the GPU's dense bf16 peak
            record['mfu'] = flops / dt / (peak * 1e12) / world_size
        if master_process:
            extra = f" | mfu {record['mfu']:.1%}" if 'mfu' in record else ''
            print(f"step {step}/{max_steps} | loss {record['loss']:.4f} | train exact {record['train_exact_acc']:.1%} "
                  f"cell {record['train_cell_acc']:.1%} steps {record['train_steps']:.1f} | lr {record['lr']:.2e} | "
                  f"{record['ms_per_step']:.0f} ms/step | {record['puzzles_per_s']:.0f} puzzles/s{extra}", flush=True)
            log_record(record)
        if step % eval_every == 0 or last or stop_requested or out_of_time:
            stopping = stop_requested and not (step % eval_every == 0 or last)
            if not stopping:  # a signal saves at once; evals run on schedule and at the end
                t_eval = time.time()
                with ema_weights():
                    result = evaluate(eval_max_puzzles, os.path.join(out_dir, 'eval_failures.csv'))
                eval_s = time.time() - t_eval
                best_exact = max(best_exact, result['exact_acc'])
                result.update(step=step, epoch=step / steps_per_epoch, wall_s=elapsed_before + time.time() - t_start,
                              puzzles_seen=puzzles_seen, eval=True)
                if master_process:
                    print(f"eval at step {step} ({result['wall_s'] / 60:.1f} min): ", end='')
                    print_breakdown(result)
                    log_record(result)
                target_reached = target_exact_acc > 0 and result['exact_acc'] >= target_exact_acc
            save_checkpoint()
            t_log = time.time()  # ms/step excludes eval and checkpoint time
            if stop_requested:
                if master_process:
                    print(f"stopped by signal at step {step}; checkpoint saved to {ckpt_path} "
                          f"(resume with --init_from=resume)")
                break
            if out_of_time or target_reached:
                if master_process:
                    why = 'reached target exact accuracy' if target_reached else f'max_minutes={max_minutes} reached'
                    print(f"stopping: {why}")
                break

finish(exit_code)
