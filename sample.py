"""
Solve Sudoku puzzles with a trained HRM checkpoint.
    python sample.py                                  # a built-in example
    python sample.py --puzzle=53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79
    python sample.py --file=puzzles.txt               # one puzzle a line ('-' reads stdin)
    python sample.py --file=data.csv                  # dataset CSV (source,question,answer,rating): reports accuracy
Options: --out_dir (checkpoint folder), --segments (0 = stop when the Q head says halt, at most
halt_max_steps), --trace, --json, --batch_size, --device. Puzzles: 81 cells, '.' or '0' for blanks;
spaces, newlines and grid drawing (| - +) are ignored.
"""

import json
import os
import sys
import time

import numpy as np
import torch

import prepare_sudoku as sudoku
from configurator import ConfigError, configure
from model import HRM, HRMConfig

# -----------------------------------------------------------------------------
out_dir = 'out-sudoku-cpu'   # where train.py wrote ckpt.pt
puzzle = ''
file = ''
segments = 0                 # 0 = ACT: stop at the Q head's halt (at most halt_max_steps; no Q head: train.py's eval_segments); N = run N
trace = False                # print how the answer changes segment by segment
json_output = False          # one JSON object per puzzle (also accepted as --json)
batch_size = 256
device = 'auto'
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
    try:
        return [(sudoku.parse_grid(puzzle or EXAMPLE), None)]
    except ValueError as e:
        fail(str(e))


def load_model(device):
    path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.exists(path):
        fail(f"no checkpoint at {path}: train one with  python train.py config/sudoku_cpu.py  or pass --out_dir=")
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=False, mmap=True)
        model_config = HRMConfig(**{k: checkpoint['config'][k] for k in HRMConfig.__dataclass_fields__})
        dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
        model = HRM(model_config, dtype=dtype)
        model.load_state_dict(checkpoint['model'])
    except Exception as e:  # a truncated or foreign file
        fail(f"cannot read checkpoint {path}: {e}")
    if checkpoint.get('ema') is not None:  # evaluate with the weights train.py evaluated with
        with torch.no_grad():
            for p, e in zip(model.parameters(), checkpoint['ema']):
                p.copy_(e)
    # without a Q head there is no halting: run as many segments as train.py's eval did
    default_segments = 0 if model_config.act == 'q' else checkpoint['config'].get('eval_segments', 0)
    return model.to(device).eval(), default_segments


def main():
    args = ['--json_output=True' if a == '--json' else '--trace=True' if a == '--trace' else a for a in sys.argv[1:]]
    try:
        configure(globals(), args)
    except ConfigError as e:
        fail(str(e))
    if batch_size < 1 or segments < 0:
        fail(f"need batch_size >= 1 and segments >= 0, got {batch_size} and {segments}")
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
    model, default_segments = load_model(dev)
    t_load = time.perf_counter() - t0
    puzzles = torch.from_numpy(np.stack([c for c, _ in items]))
    answers = [a for _, a in items]
    t0 = time.perf_counter()
    results = []
    for start in range(0, len(items), batch_size):
        inputs = puzzles[start:start + batch_size].to(dev).long() + 1
        n = segments or default_segments or None  # None: up to halt_max_steps
        preds, steps, _, history = model.solve(inputs, segments=n, halt=segments == 0, trace=trace)
        preds = (preds - 1).clamp(min=0).cpu()
        valid, consistent = sudoku.check_grids(puzzles[start:start + batch_size], preds)
        results += [(preds[j], int(steps[j]), bool(valid[j]), bool(consistent[j]),
                     None if history is None else (history[:, j] - 1).clamp(min=0).cpu()) for j in range(len(preds))]
    t_solve = time.perf_counter() - t0

    for (cells, answer), (pred, steps, valid, consistent, history) in zip(items, results):
        if json_output:
            print(json.dumps({'puzzle': sudoku.grid_to_string(cells), 'solution': sudoku.grid_to_string(pred.numpy()),
                              'valid': valid, 'consistent': consistent, 'steps': steps}))
            continue
        if len(items) > 1 and answer is not None:
            continue  # dataset mode: only the summary below
        if trace:
            previous = None
            for t, grid in enumerate(history[:steps]):
                changed = 81 if previous is None else int((grid != previous).sum())
                ok, _ = sudoku.check_grids(torch.from_numpy(cells)[None], grid[None])
                print(f"segment {t + 1:2d}: {sudoku.grid_to_string(grid.numpy())}  {changed:2d} cells changed"
                      f"{'  valid' if ok[0] else ''}")
                previous = grid
        print(sudoku.format_side_by_side([cells, pred.numpy()], ['puzzle', 'HRM answer']))
        print(f"valid sudoku: {'yes' if valid else 'NO'} | keeps every given: {'yes' if consistent else 'NO'} | "
              f"segments: {steps} | load {t_load * 1000:.0f} ms, solve {t_solve * 1000:.0f} ms\n")
    if any(a is not None for a in answers):
        known = [(r[0], a) for r, a in zip(results, answers) if a is not None]
        exact = sum(bool((pred.numpy() == a).all()) for pred, a in known)
        print(f"exact accuracy {exact / len(known):.2%} ({exact}/{len(known)}) | valid {sum(r[2] for r in results) / len(results):.2%} | "
              f"{len(items) / t_solve:.0f} puzzles/s on {dev.type}", file=sys.stderr if json_output else sys.stdout)


if __name__ == '__main__':
    main()
