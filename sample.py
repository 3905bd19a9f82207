"""
Solve Sudoku puzzles with a trained HRM checkpoint.
    python sample.py                                  # a built-in example
    python sample.py --puzzle=53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79
    python sample.py --file=puzzles.txt               # one puzzle a line ('-' reads stdin)
    python sample.py --file=data.csv                  # dataset CSV (source,question,answer,rating): reports accuracy
    python sample.py --file=data.csv --views=8 --segments=64   # test-time compute: 8 symmetric views, 64 segments
Puzzles: 81 cells, '.' or '0' for blanks; spaces, newlines and grid drawing (| - +) are ignored.
Every setting below is an option (--key=value); --json and --trace alone switch those on.
"""

import json
import os
import sys
import time

import numpy as np
import torch

import prepare_sudoku as sudoku
from configurator import ConfigError, configure, fail
from model import load_checkpoint

EXAMPLE = '53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79'
# -----------------------------------------------------------------------------
out_dir = 'out-sudoku-cpu'   # where train.py wrote ckpt.pt
puzzle = EXAMPLE
file = ''                    # puzzles one a line, or a dataset CSV; '-' = stdin. Takes the place of --puzzle
segments = 0                 # 0 = until the Q head halts, at most halt_max_steps (no Q head: the run's eval_segments)
views = 1                    # random symmetries of each puzzle solved together (the first is the puzzle as given)
check = True                 # stop a puzzle at the first segment where an answer is a valid grid keeping the givens
restart = 0                  # a view not checking after this many segments starts over as a new random view (0 = off)
hints = 0                    # a restarted view keeps this many of its surest answer cells as extra givens
trace = False                # print how the answer changes segment by segment
json_output = False          # one JSON object per puzzle (also --json)
batch_size = 256             # puzzles per solve
device = 'auto'              # 'auto' = cuda if there is one, else cpu
dtype = 'auto'               # the run's own (bf16 on CUDA for a run that used 'auto'), or float32, bfloat16, float16
seed = 0                     # draws the views
# -----------------------------------------------------------------------------


def read_puzzles():
    """List of (puzzle cells, known solution or None) from --file, else --puzzle."""
    if not file:
        try:
            return [(sudoku.parse_grid(puzzle), None)]
        except ValueError as e:
            fail(str(e))
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


def solve_all(model, puzzles, generator, **settings):
    """model.solve in batches of batch_size. Returns the Solution's grids, steps and view on the CPU (with trace
    also each puzzle's history), and the seconds taken, the copies included so that the clock waits for the GPU."""
    t0 = time.perf_counter()
    parts = [model.solve(puzzles[i:i + batch_size], generator=generator, **settings)
             for i in range(0, len(puzzles), batch_size)]
    result = {key: torch.cat([getattr(part, key).cpu() for part in parts]) for key in ('grids', 'steps', 'view')}
    if settings.get('trace'):  # per puzzle, since batches that halted at different segments have different T
        result['history'] = [h for part in parts for h in part.history.cpu().unbind(1)]  # each (T, K, 81)
    return result, time.perf_counter() - t0


def summary(puzzles, result, solutions, seconds, dev):
    grids = result['grids']
    exact = int((grids == solutions).all(-1).sum())
    valid = sudoku.check_grids(puzzles.cpu(), grids)[0].float().mean()
    return (f"exact accuracy {exact / len(grids):.2%} ({exact}/{len(grids)}) | valid {valid:.2%} | "
            f"mean segments {result['steps'].float().mean():.1f} | {len(grids) / seconds:.1f} puzzles/s on {dev.type}")


def print_trace(cells, history, view):
    """One line per segment for the view the answer came from (the puzzle as given when the views voted)."""
    shown, previous = max(view, 0), None
    for t, grids in enumerate(history):                                                # grids: (K, 81)
        valid, consistent = sudoku.check_grids(torch.from_numpy(cells).expand(len(grids), 81), grids)
        checks = valid & consistent
        changed = 81 if previous is None else int((grids[shown] != previous).sum())
        print(f"segment {t + 1:2d}: {sudoku.grid_to_string(grids[shown].numpy())}  {changed:2d} cells changed"
              f"{'  valid' if checks[shown] else ''}"
              f"{f'  ({int(checks.sum())}/{len(grids)} views check)' if len(grids) > 1 else ''}")
        previous = grids[shown]


def main():
    args = [{'--json': '--json_output=True', '--trace': '--trace=True'}.get(a, a) for a in sys.argv[1:]]
    try:
        configure(globals(), args)
    except ConfigError as e:
        fail(str(e))
    if batch_size < 1 or segments < 0 or views < 1 or restart < 0 or hints < 0:
        fail(f"need batch_size >= 1, segments >= 0, views >= 1, restart >= 0 and hints >= 0, "
             f"got {batch_size}, {segments}, {views}, {restart} and {hints}")
    if hints and not restart:
        fail("hints are kept when a view restarts: set --restart too")
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
        dev = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as e:
        fail(f"device={device!r} is not usable: {e}")

    t0 = time.perf_counter()
    try:
        model, run_config = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'), dev,
                                            None if dtype == 'auto' else getattr(torch, dtype))
    except ValueError as e:
        fail(f"{e}: train one with  python train.py config/sudoku_cpu.py  or pass --out_dir=")
    t_load = time.perf_counter() - t0
    act = model.config.act == 'q'
    # without a Q head nothing says halt: by default run as many segments as train.py's eval did
    n = segments or (None if act else run_config.get('eval_segments') or None)  # None = halt_max_steps
    generator = torch.Generator(device=dev).manual_seed(seed)
    puzzles = torch.from_numpy(np.stack([cells for cells, _ in items])).to(dev)
    result, t_solve = solve_all(model, puzzles, generator, segments=n, halt=act and segments == 0, views=views,
                                check=check, restart=restart, hints=hints, trace=trace)
    valid, consistent = sudoku.check_grids(puzzles.cpu(), result['grids'])

    for i, (cells, answer) in enumerate(items):
        steps, view, grid = int(result['steps'][i]), int(result['view'][i]), result['grids'][i].numpy()
        if json_output:
            print(json.dumps({'puzzle': sudoku.grid_to_string(cells), 'solution': sudoku.grid_to_string(grid),
                              'valid': bool(valid[i]), 'consistent': bool(consistent[i]), 'steps': steps,
                              'view': view}))
            continue
        if len(items) > 1 and answer is not None:
            continue  # dataset mode: only the summary below
        if trace:
            print_trace(cells, result['history'][i][:steps], view)
        print(sudoku.format_side_by_side([cells, grid], ['puzzle', 'HRM answer']))
        source = '' if views == 1 else (f" | answer from view {view + 1} of {views}" if view >= 0 else
                                        f" | no view checks: per-cell vote over {views} views")
        print(f"valid sudoku: {'yes' if valid[i] else 'NO'} | keeps every given: {'yes' if consistent[i] else 'NO'} | "
              f"segments: {steps}{source} | load {t_load * 1000:.0f} ms, solve {t_solve * 1000:.0f} ms\n")

    if any(answer is not None for _, answer in items):
        out = sys.stderr if json_output else sys.stdout  # stdout stays one JSON object a line
        solutions = torch.from_numpy(np.stack([answer for _, answer in items]))
        if views == 1 and not check and not restart:
            print(summary(puzzles, result, solutions, t_solve, dev), file=out)
            return
        # test-time compute: the paper's number too (the puzzle as given, fixed segments, no check), never mixed
        paper, t_paper = solve_all(model, puzzles, generator, segments=n)
        print(f"paper metric (1 view, {int(paper['steps'].max())} segments, no check): "
              f"{summary(puzzles, paper, solutions, t_paper, dev)}", file=out)
        print(f"test-time ({views} view{'s' * (views > 1)}, up to {n or model.config.halt_max_steps} segments"
              f"{', checked' if check else ''}{f', restarted every {restart}' if restart else ''}"
              f"{f' keeping {hints} hints' if hints else ''}): "
              f"{summary(puzzles, result, solutions, t_solve, dev)}", file=out)


if __name__ == '__main__':
    main()
