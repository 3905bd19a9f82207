"""
Solve Sudoku puzzles with a trained HRM checkpoint.
    python sample.py                                  # a built-in example
    python sample.py --puzzle=53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79
    python sample.py --file=puzzles.txt               # one puzzle a line ('-' reads stdin)
    python sample.py --file=data.csv                  # dataset CSV (source,question,answer,rating): reports accuracy
    python sample.py --file=data.csv --views=8 --segments=64   # test-time compute: 8 symmetric views, 64 segments
Options: --out_dir (checkpoint folder), --segments (0 = stop when the Q head says halt, at most
halt_max_steps; no Q head: train.py's eval_segments), --views (random symmetries solved per puzzle),
--check (stop a puzzle once an answer checks), --trace, --json, --batch_size, --device, --dtype, --seed.
Puzzles: 81 cells, '.' or '0' for blanks; spaces, newlines and grid drawing (| - +) are ignored.
"""

import json
import os
import sys
import time

import numpy as np
import torch

import prepare_sudoku as sudoku
from configurator import ConfigError, configure
from model import load_checkpoint

# -----------------------------------------------------------------------------
out_dir = 'out-sudoku-cpu'   # where train.py wrote ckpt.pt
puzzle = ''
file = ''
segments = 0                 # 0 = ACT: stop at the Q head's halt (at most halt_max_steps; no Q head: train.py's eval_segments); N = up to N
views = 1                    # random symmetries of each puzzle solved together (the first is the puzzle as given)
check = True                 # stop a puzzle at the first segment where an answer is a valid grid keeping the givens
trace = False                # print how the answer changes segment by segment
json_output = False          # one JSON object per puzzle (also accepted as --json)
batch_size = 256
device = 'auto'
dtype = 'auto'               # 'auto' = the run's own (bf16 on CUDA for a run that used 'auto'), or float32/bfloat16/float16
seed = 0                     # draws the views
EXAMPLE = '53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79'
# -----------------------------------------------------------------------------


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def read_puzzles():
    """List of (puzzle cells, known solution or None) from --puzzle, --file or the built-in example."""
    if file:
        if file != '-' and not os.path.isfile(file):
            fail(f"no such file: {file}")
        try:
            lines = (sys.stdin if file == '-' else open(file)).read().splitlines()
        except (OSError, UnicodeDecodeError) as e:  # unreadable or not text
            fail(f"cannot read {file}: {e}")
        if file != '-' and lines and lines[0].replace(' ', '').startswith('source,question,answer'):
            try:  # a dataset CSV: the same loader and row checks as prepare_sudoku.py
                rows = sudoku.load_csv(file)[0]
            except (ValueError, OSError) as e:
                fail(str(e))
            return [(row[:81], row[81:]) for row in rows]
        items = []
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    items.append((sudoku.parse_grid(line), None))
                except ValueError as e:
                    fail(f"{file}:{number}: {e}")
        return items
    given = any(a.startswith('--puzzle=') for a in sys.argv[1:])  # an empty --puzzle= is a mistake, not a request for the example
    try:
        return [(sudoku.parse_grid(puzzle if given else EXAMPLE), None)]
    except ValueError as e:
        fail(str(e))


def solve_all(model, puzzles, generator, **settings):
    """model.solve over batches; returns the Solution fields as CPU tensors, concatenated, and the seconds taken."""
    parts = []
    t0 = time.perf_counter()
    for start in range(0, len(puzzles), batch_size):
        result = model.solve(puzzles[start:start + batch_size], generator=generator, **settings)
        parts.append({k: v for k, v in result._asdict().items() if v is not None})
    fields = {k: torch.cat([p[k].cpu() for p in parts], dim=1 if k == 'history' else 0) for k in parts[0]}
    return fields, time.perf_counter() - t0


def main():
    args = ['--json_output=True' if a == '--json' else '--trace=True' if a == '--trace' else a for a in sys.argv[1:]]
    try:
        configure(globals(), args)
    except ConfigError as e:
        fail(str(e))
    if batch_size < 1 or segments < 0 or views < 1:
        fail(f"need batch_size >= 1, segments >= 0 and views >= 1, got {batch_size}, {segments} and {views}")
    if dtype not in ('auto', 'float32', 'bfloat16', 'float16'):
        fail(f"dtype={dtype!r} is not one of auto, float32, bfloat16, float16")
    items = read_puzzles()
    if not items:
        fail("no puzzles given")
    for i, (cells, _) in enumerate(items):
        conflicts = sudoku.find_conflicts(cells)
        if conflicts:
            where = f"puzzle {i + 1}: " if len(items) > 1 else ''
            fail(f"{where}the givens already conflict ({'; '.join(conflicts)})")
    try:  # an unknown or unavailable device fails here in one line
        dev = torch.device('cuda' if device == 'auto' and torch.cuda.is_available() else 'cpu' if device == 'auto' else device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as e:
        fail(f"device={device!r} is not usable: {e}")

    t0 = time.perf_counter()
    try:
        model, run_config = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'), dev, None if dtype == 'auto' else getattr(torch, dtype))
    except ValueError as e:
        fail(f"{e}: train one with  python train.py config/sudoku_cpu.py  or pass --out_dir=")
    t_load = time.perf_counter() - t0
    # without a Q head there is no halting: by default run as many segments as train.py's eval did
    act = model.config.act == 'q'
    n = segments or (None if act else run_config.get('eval_segments') or None)  # None: halt_max_steps
    generator = torch.Generator(device=dev).manual_seed(seed)
    puzzles = torch.from_numpy(np.stack([c for c, _ in items])).to(dev)
    result, t_solve = solve_all(model, puzzles, generator, segments=n, halt=act and segments == 0, views=views,
                                check=check, trace=trace)
    valid, consistent = sudoku.check_grids(puzzles.cpu(), result['grids'])
    ttc = views > 1 or check

    for i, (cells, answer) in enumerate(items):
        steps = int(result['steps'][i])
        if json_output:
            print(json.dumps({'puzzle': sudoku.grid_to_string(cells), 'solution': sudoku.grid_to_string(result['grids'][i].numpy()),
                              'valid': bool(valid[i]), 'consistent': bool(consistent[i]), 'steps': steps,
                              'view': int(result['view'][i])}))
            continue
        if len(items) > 1 and answer is not None:
            continue  # dataset mode: only the summary below
        view = int(result['view'][i])
        if trace:  # the view the answer came from (the puzzle as given when the views were voted)
            history = result['history'][:steps, i]                                    # (T, K, 81)
            previous = None
            for t, grids in enumerate(history):
                grid = grids[max(view, 0)]
                changed = 81 if previous is None else int((grid != previous).sum())
                ok = sudoku.check_grids(torch.from_numpy(cells).expand(len(grids), 81), grids)
                n_ok = int((ok[0] & ok[1]).sum())
                print(f"segment {t + 1:2d}: {sudoku.grid_to_string(grid.numpy())}  {changed:2d} cells changed"
                      f"{'  valid' if n_ok and (ok[0] & ok[1])[max(view, 0)] else ''}"
                      f"{f'  ({n_ok}/{views} views check)' if views > 1 else ''}")
                previous = grid
        print(sudoku.format_side_by_side([cells, result['grids'][i].numpy()], ['puzzle', 'HRM answer']))
        source = '' if views == 1 else (f" | answer from view {view + 1} of {views}" if view >= 0 else
                                        f" | no view checks: per-cell vote over {views} views")
        print(f"valid sudoku: {'yes' if valid[i] else 'NO'} | keeps every given: {'yes' if consistent[i] else 'NO'} | "
              f"segments: {steps}{source} | load {t_load * 1000:.0f} ms, solve {t_solve * 1000:.0f} ms\n")
    if any(a is not None for _, a in items):
        out = sys.stderr if json_output else sys.stdout
        solutions = torch.from_numpy(np.stack([a for _, a in items]))
        if ttc:  # the paper's number too, never mixed with the test-time one: the puzzle as given, fixed segments, no check
            paper, t_paper = solve_all(model, puzzles, generator, segments=n)
            print(f"paper metric (1 view, {int(paper['steps'].max())} segments, no check): "
                  f"{summary(puzzles, paper, solutions, t_paper, dev)}", file=out)
        label = (f"test-time ({views} view{'s' * (views > 1)}, up to {n or model.config.halt_max_steps} segments"
                 f"{', checked' if check else ''}): ") if ttc else ''
        print(label + summary(puzzles, result, solutions, t_solve, dev), file=out)


def summary(puzzles, result, solutions, seconds, dev):
    grids = result['grids']
    exact = int((grids == solutions).all(-1).sum())
    valid = sudoku.check_grids(puzzles.cpu(), grids)[0].float().mean()
    return (f"exact accuracy {exact / len(grids):.2%} ({exact}/{len(grids)}) | valid {valid:.2%} | "
            f"mean segments {result['steps'].float().mean():.1f} | {len(grids) / seconds:.0f} puzzles/s on {dev.type}")


if __name__ == '__main__':
    main()
