"""
Prepare the Sudoku data for nanoHRM, and hold the puzzle utilities the other scripts import.

Where the data comes from (pick one):
$ python prepare_sudoku.py                                    # Sudoku-Extreme from Hugging Face, 1000 train puzzles
$ python prepare_sudoku.py --source=DIR                       # DIR holds train.csv and test.csv
$ python prepare_sudoku.py --train_csv=A.csv --test_csv=B.csv
$ python prepare_sudoku.py --source=generate --n_train=1000 --min_givens=24 --max_givens=32
$ python prepare_sudoku.py --show=data/sudoku-extreme-1k      # look inside a prepared dataset

What it writes to --out_dir (default data/sudoku-extreme-1k):
train.bin, test.bin                 uint8 (N, 162): 81 puzzle cells then 81 solution cells, 0 = blank
train_rating.bin, test_rating.bin   uint16 (N,): solver guesses needed, the Sudoku-Extreme difficulty
meta.json                           counts, histograms, sha256 of each .bin, the options used

Cells are numbered row by row, 0..80. Digits are 1..9 and 0 is a blank everywhere in this repo.
"""

import argparse
import contextlib
import hashlib
import http.client
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

# -----------------------------------------------------------------------------
# board geometry: the 27 units (9 rows, 9 columns, 9 boxes) and each cell's 20 peers

ROWS = [[r * 9 + c for c in range(9)] for r in range(9)]
COLS = [[r * 9 + c for r in range(9)] for c in range(9)]
BOXES = [[(b // 3 * 3 + i // 3) * 9 + b % 3 * 3 + i % 3 for i in range(9)] for b in range(9)]
UNITS = ROWS + COLS + BOXES
UNIT_NAMES = [f"{kind} {i + 1}" for kind in ("row", "column", "box") for i in range(9)]
PEERS = [tuple(sorted({p for unit in UNITS if c in unit for p in unit} - {c})) for c in range(81)]
CELL_UNITS = [tuple(u for u, unit in enumerate(UNITS) if c in unit) for c in range(81)]
ALL_DIGITS = 0b1111111110  # digit d as the bit 1 << d: the solver's candidate masks, check_grids' unit sums

FORMAT = ("train.bin/test.bin: uint8 array (N, 162), row-major, no header; columns 0..80 are the puzzle "
          "cells and 81..161 the solution cells, row by row; 0 = blank, 1..9 = digit. "
          "train_rating.bin/test_rating.bin: uint16 array (N,), the rating of each row (clipped at 65535).")

# difficulty bins shared with train.py's eval, so accuracy per bin means the same thing everywhere
RATING_BINS = [(0, 0, "0"), (1, 2, "1-2"), (3, 9, "3-9"), (10, 29, "10-29"), (30, None, "30+")]
GIVENS_BINS = [(17, 21, "17-21"), (22, 25, "22-25"), (26, 29, "26-29"), (30, 34, "30-34"), (35, 40, "35-40"),
               (41, None, "41+")]


def bin_index(values, bins=RATING_BINS):
    """Index into bins (contiguous (lo, hi, name) ranges, ascending) for each value, -1 below the first;
    takes a numpy array or a torch tensor and returns the same kind."""
    starts = [low for low, _, _ in bins]
    if isinstance(values, torch.Tensor):
        return torch.searchsorted(torch.tensor(starts, device=values.device), values.long(), right=True) - 1
    return np.searchsorted(starts, np.asarray(values, dtype=np.int64), side="right") - 1

# -----------------------------------------------------------------------------
# text <-> grid, and checking grids


def _as_list(cells):
    # numpy and torch scalars are slow in Python loops, and an element of a tensor prints as tensor(5)
    return cells.tolist() if hasattr(cells, "tolist") else list(cells)


def parse_grid(text):
    """81 cells from text: digits 1-9, '.' or '0' for blanks; whitespace and '|', '-', '+' are ignored."""
    for ch in text:
        if not (ch in "123456789.0|-+" or ch.isspace()):
            raise ValueError(f"illegal character {ch!r} in sudoku grid (allowed: 1-9, '.' or '0' for blanks)")
    cells = [0 if ch == "." else int(ch) for ch in text if ch in "123456789.0"]
    if len(cells) != 81:
        raise ValueError(f"a sudoku grid has 81 cells, found {len(cells)}")
    return np.array(cells, dtype=np.uint8)


def grid_to_string(cells):
    return "".join(str(d) if d else "." for d in _as_list(cells))


def format_grid(cells):
    text = grid_to_string(cells)
    rows = [" | ".join(" ".join(text[i:i + 3]) for i in range(r, r + 9, 3)) for r in range(0, 81, 9)]
    return "\n".join(rows[:3] + ["------+-------+------"] + rows[3:6] + ["------+-------+------"] + rows[6:])


def format_side_by_side(grids, titles):
    """Several grids next to each other with a title above each, e.g. puzzle | model answer | solution."""
    blocks = [format_grid(g).split("\n") for g in grids]  # 11 lines of 21 characters each
    title = "   ".join(t[:21].ljust(21) for t in titles).rstrip()
    return "\n".join([title] + ["   ".join(lines) for lines in zip(*blocks)])


def find_conflicts(cells):
    """Names of the units that repeat a digit among their filled cells, [] if none. For messages about one
    grid; check_grids is the fast check of many."""
    cells = _as_list(cells)
    return [name for name, unit in zip(UNIT_NAMES, UNITS)
            if len([cells[i] for i in unit if cells[i]]) != len({cells[i] for i in unit if cells[i]})]


def check_grids(puzzles, preds):
    """Vectorized check of model answers and of CSV rows. puzzles, preds: (N, 81) integer tensors on any device.
    Returns (valid, consistent), bool (N,): valid = preds is a complete valid sudoku,
    consistent = preds keeps every given of its puzzle."""
    # digit d -> bit 1 << d, blanks and junk -> 0. A unit holds 1..9 once each exactly when its bits sum to
    # ALL_DIGITS: 9 powers of two sum to a number with 9 one-bits only if no two are equal. Sums of slices
    # need no gather of the 27 units, several times faster than sorting them.
    bits = ((1 << preds.clamp(0, 10).int()) & ALL_DIGITS).reshape(-1, 9, 9)
    boxes = bits.reshape(-1, 3, 3, 3, 3).sum((2, 4), dtype=torch.int32).flatten(1)        # (N, band, stack) -> (N, 9)
    units = torch.cat([bits.sum(2, dtype=torch.int32), bits.sum(1, dtype=torch.int32), boxes], dim=1)  # (N, 27)
    valid = (units == ALL_DIGITS).all(dim=1)
    consistent = ((puzzles == 0) | (puzzles == preds)).all(dim=1)
    return valid, consistent

# -----------------------------------------------------------------------------
# solver: constraint propagation (naked and hidden singles) plus branching, on candidate bitmasks.
# cand[cell] has bit d set while digit d (1..9) is still possible there; one bit left = the cell is fixed.

POPCOUNT = [bin(m).count("1") for m in range(1024)]
DIGIT_OF_BIT = {1 << d: d for d in range(1, 10)}


def _propagate(cand, done, queue):
    """Apply naked and hidden singles until nothing changes. done[unit] is the mask of digits already
    fixed in each of the 27 units; queue holds the freshly fixed cells whose digit still has to be
    removed from their peers. Returns False on a contradiction."""
    peers, popcount, units, cell_units = PEERS, POPCOUNT, UNITS, CELL_UNITS  # locals: the hot loop
    while True:
        while queue:
            cell = queue.pop()
            bit = cand[cell]
            for u in cell_units[cell]:
                done[u] |= bit
            for peer in peers[cell]:
                m = cand[peer]
                if m & bit:
                    m ^= bit
                    if not m:
                        return False
                    cand[peer] = m
                    if popcount[m] == 1:
                        queue.append(peer)
        # hidden singles: a digit with a single place left in a unit must go there
        for u, unit in enumerate(units):
            if done[u] == ALL_DIGITS:
                continue
            once = twice = 0
            for cell in unit:
                m = cand[cell]
                twice |= once & m
                once |= m
            if once != ALL_DIGITS:
                return False  # some digit has nowhere to go in this unit
            hidden = once & ~twice & ~done[u]
            while hidden:
                bit = hidden & -hidden
                hidden ^= bit
                for cell in unit:
                    if cand[cell] & bit:
                        break
                else:
                    return False  # its only cell was just taken by another hidden single
                cand[cell] = bit
                queue.append(cell)
        if not queue:
            return True


def _search(cand, done, queue, limit, solutions, stats, rng):
    """Depth-first search; appends up to `limit` solutions. stats = [guesses, guesses before 1st solution]."""
    if not _propagate(cand, done, queue):
        return
    # branch on the open cell with the fewest candidates: the fewest wrong guesses to back out of
    best, best_count = -1, 10
    for cell in range(81):
        n = POPCOUNT[cand[cell]]
        if 1 < n < best_count:
            best, best_count = cell, n
            if n == 2:
                break
    if best < 0:
        solutions.append([DIGIT_OF_BIT[m] for m in cand])
        if len(solutions) == 1:
            stats[1] = stats[0]
        return
    bits = [1 << d for d in range(1, 10) if cand[best] >> d & 1]
    if rng is not None:
        rng.shuffle(bits)
    for bit in bits:
        stats[0] += 1
        child = cand[:]
        child[best] = bit
        _search(child, done[:], [best], limit, solutions, stats, rng)
        if len(solutions) >= limit:
            return


def _solutions(cells, limit, rng=None):
    """(up to `limit` solutions as lists, rating) for 81 digits 0..9. The rating is the number of guesses made
    before the first solution: 0 means singles propagation alone solves it.
    rng (a random.Random) shuffles the order digits are tried in: make_puzzle's random grids."""
    solutions, stats = [], [0, 0]
    cand = [1 << d if d else ALL_DIGITS for d in cells]
    _search(cand, [0] * 27, [cell for cell, d in enumerate(cells) if d], limit, solutions, stats, rng)
    return solutions, stats[1]

# -----------------------------------------------------------------------------
# generator: unique-solution puzzles carved out of random complete grids

START_GIVENS = 36  # clues kept at first: fewer leave many solutions, and repairing those costs more
TARGET_TRIES = 4   # fresh grids tried for the exact target count before settling for the closest
MAX_ATTEMPTS = 200  # fresh grids tried before giving up on getting down to max_givens


def make_puzzle(rng, target):
    """One unique-solution puzzle with at least `target` givens: (puzzle, solution, rating), lists of 81.
    It lands on `target` unless the puzzle became minimal (no clue removable) above it."""
    # a random grid: the three diagonal boxes share no unit, so any digits go there; a randomized search
    # fills the rest
    cells = [0] * 81
    for box in (0, 4, 8):
        digits = list(range(1, 10))
        rng.shuffle(digits)
        for cell, d in zip(BOXES[box], digits):
            cells[cell] = d
    solution = _solutions(cells, 1, rng)[0][0]
    order = list(range(81))
    rng.shuffle(order)
    kept = set(order[:max(target, START_GIVENS)])
    puzzle = [d if cell in kept else 0 for cell, d in enumerate(solution)]
    # a random set of cells rarely has a unique solution: repair it with a few targeted clues (the true digit
    # where a second solution differs rules that one out), much cheaper than finding uniqueness by removing
    # clues one by one from the full grid
    solutions, rating = _solutions(puzzle, 2)
    while len(solutions) > 1:
        other = solutions[0] if solutions[0] != solution else solutions[1]
        cell = rng.choice([i for i in range(81) if other[i] != solution[i]])
        puzzle[cell] = solution[cell]
        solutions, rating = _solutions(puzzle, 2)
    # then take clues out in random order, keeping each removal that leaves the solution unique
    givens = [cell for cell in range(81) if puzzle[cell]]
    rng.shuffle(givens)
    n_givens = len(givens)
    for cell in givens:
        if n_givens <= target:
            break
        digit, puzzle[cell] = puzzle[cell], 0
        solutions, guesses = _solutions(puzzle, 2)
        if len(solutions) == 1:
            rating, n_givens = guesses, n_givens - 1
        else:
            puzzle[cell] = digit
    return puzzle, solution, rating


def _generate_one(job):
    """Puzzle number `index` of a generate() run. Its random stream comes from (seed, index) alone,
    so the output does not depend on how the puzzles are spread over workers."""
    seed, index, min_givens, max_givens = job
    rng = random.Random(f"{seed}:{index}")
    target = rng.randint(min_givens, max_givens)
    best = None
    for attempt in range(MAX_ATTEMPTS):
        puzzle, solution, rating = make_puzzle(rng, target)
        n_givens = sum(1 for d in puzzle if d)
        if n_givens <= max_givens and (best is None or n_givens < best[0]):
            best = (n_givens, puzzle, solution, rating)
        # low targets often end minimal a few clues above: a few more grids get closer, then take the best
        if best is not None and (best[0] == target or attempt + 1 >= TARGET_TRIES):
            return best[1:]
    raise ValueError(f"found no unique puzzle with at most {max_givens} givens in {MAX_ATTEMPTS} tries; "
                     "removing clues at random rarely gets below ~22 givens, raise --max_givens")


def generate(n, min_givens, max_givens, seed, workers=1, progress=True):
    """n unique-solution puzzles, the number of givens of each drawn uniformly from [min_givens, max_givens]
    (below ~24 random removal often gets stuck a little above the draw, so low counts come out rarer).
    Returns (rows uint8 (n, 162): puzzle then solution, ratings int64 (n,)), the same for any `workers`."""
    if not 17 <= min_givens <= max_givens <= 80:
        raise ValueError(f"need 17 <= min_givens <= max_givens <= 80, got min_givens={min_givens}, "
                         f"max_givens={max_givens} (no sudoku with fewer than 17 givens has a unique solution)")
    rows, ratings = np.zeros((n, 162), dtype=np.uint8), np.zeros(n, dtype=np.int64)
    jobs = [(seed, i, min_givens, max_givens) for i in range(n)]
    t0 = last_print = time.time()
    with multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:  # exit terminates
        results = pool.imap(_generate_one, jobs, chunksize=8) if pool else map(_generate_one, jobs)
        for i, (puzzle, solution, rating) in enumerate(results):
            rows[i], ratings[i] = puzzle + solution, rating
            if progress and (time.time() - last_print > 0.25 or i + 1 == n):
                last_print = time.time()
                bar = "#" * (30 * (i + 1) // n)
                print(f"\rgenerating [{bar:<30}] {i + 1}/{n}", end="", file=sys.stderr, flush=True)
    if progress:
        seconds = time.time() - t0
        print(f"\ngenerated {n} puzzles in {seconds:.1f}s: {n / max(seconds, 1e-9):.0f} puzzles/s "
              f"with {workers} worker(s)", file=sys.stderr)
    return rows, ratings

# -----------------------------------------------------------------------------
# augmentation: random symmetries that map a valid sudoku to a valid sudoku


def random_symmetry(n, generator=None, device=None):
    """n random Sudoku symmetries, each a relabelling of the digits, a permutation of the bands, the stacks,
    the rows inside each band and the columns inside each stack, and a transpose half the time.
    Returns (index, digits): output cell i takes input cell index[:, i], and digit d becomes digits[:, d]
    (index (n, 81), digits (n, 10) with 0 -> 0, so blanks stay blank)."""
    def permutations(*shape):  # random permutations of 0..shape[-1]-1 along the last dim
        return torch.rand(*shape, generator=generator, device=device).argsort(dim=-1)

    # source row of each output row: pick a band, then a row inside it; columns likewise with stacks
    rows = (permutations(n, 3)[:, :, None] * 3 + permutations(n, 3, 3)).view(n, 9)
    cols = (permutations(n, 3)[:, :, None] * 3 + permutations(n, 3, 3)).view(n, 9)
    index = rows[:, :, None] * 9 + cols[:, None, :]                            # (n, 9, 9) source cell
    transpose = torch.rand(n, generator=generator, device=device) < 0.5
    index = torch.where(transpose[:, None, None], index.transpose(1, 2), index).reshape(n, 81)
    digits = torch.cat([torch.zeros(n, 1, dtype=torch.long, device=device), permutations(n, 9) + 1], dim=1)
    return index, digits


def identity_symmetry(n, device=None):
    return (torch.arange(81, device=device).expand(n, 81).clone(),
            torch.arange(10, device=device).expand(n, 10).clone())


def apply_symmetry(grids, symmetry):
    """grids (n, 81) of 0..9 under each row's symmetry; keeps the dtype."""
    index, digits = symmetry
    return digits.gather(1, grids.long().gather(1, index)).to(grids.dtype)


def invert_symmetry(grids, symmetry):
    """The inverse of apply_symmetry: invert_symmetry(apply_symmetry(g, s), s) == g. Used to map the answer
    to a transformed view of a puzzle back to the puzzle's own cells and digits."""
    index, digits = symmetry
    return digits.argsort(dim=1).gather(1, grids.long().gather(1, index.argsort(dim=1))).to(grids.dtype)


def augment(puzzles, solutions, generator=None):
    """Every row (puzzle and solution, (B, 81) integer tensors, 0 = blank) under its own random symmetry."""
    symmetry = random_symmetry(puzzles.shape[0], generator, puzzles.device)
    return apply_symmetry(puzzles, symmetry), apply_symmetry(solutions, symmetry)


def reveal(puzzles, solutions, min_givens, generator=None):
    """Easier versions of puzzles, for a curriculum: a row with fewer than min_givens givens gets random blank
    cells filled in from its solution until it has min_givens (a unique-solution puzzle stays unique, with the
    same solution). puzzles, solutions: (B, 81) integer tensors, 0 = blank. Returns a new puzzles tensor."""
    blank = puzzles == 0
    need = (min_givens - (~blank).sum(1, keepdim=True)).clamp(min=0)
    # the blanks of each row in a random order (givens sort last); the first `need` of them are revealed
    order = torch.rand(puzzles.shape, generator=generator, device=puzzles.device).masked_fill(~blank, 2.0)
    rank = order.argsort(1).argsort(1)
    return torch.where(blank & (rank < need), solutions, puzzles)

# -----------------------------------------------------------------------------
# reading a prepared dataset (what train.py and friends use)


def _prepared_file(data_dir, name):
    path = Path(data_dir) / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; make the dataset first: "
                                f"python prepare_sudoku.py --out_dir={data_dir}")
    return path


def read_split(data_dir, split):
    """The rows of a split as a read-only uint8 memmap (N, 162): puzzle cells then solution cells."""
    path = _prepared_file(data_dir, f"{split}.bin")
    n, rest = divmod(path.stat().st_size, 162)
    if rest:
        raise ValueError(f"{path} holds {path.stat().st_size} bytes, not a whole number of 162-byte rows")
    # np.memmap refuses an empty file
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(n, 162)) if n else np.zeros((0, 162), dtype=np.uint8)


def read_ratings(data_dir, split):
    """The rating of each row of a split as a read-only uint16 memmap (N,)."""
    path = _prepared_file(data_dir, f"{split}_rating.bin")
    return np.memmap(path, dtype=np.uint16, mode="r") if path.stat().st_size else np.zeros(0, dtype=np.uint16)


def read_meta(data_dir):
    return json.loads(_prepared_file(data_dir, "meta.json").read_text())

# -----------------------------------------------------------------------------
# loading Sudoku-Extreme style CSVs: source,question,answer,rating

CSV_HEADER = b"source,question,answer,rating"
CHUNK_ROWS = 1 << 16  # rows decoded per numpy pass: bounds the temporary arrays
QUESTION_CHARS, ANSWER_CHARS = "123456789.0", "123456789"


def _byte_table(allowed):  # byte -> digit for vectorized decoding, '.' and '0' are blanks; 255: not allowed
    return np.array([int(chr(b).replace(".", "0")) if chr(b) in allowed else 255 for b in range(256)], dtype=np.uint8)


QUESTION_BYTES, ANSWER_BYTES = _byte_table(QUESTION_CHARS), _byte_table(ANSWER_CHARS)


def load_csv(path, skip_bad=False):
    """Read a CSV with header source,question,answer,rating ('.' or '0' blanks in the question).
    Every row is checked; a bad one raises ValueError "path:line: reason" unless skip_bad drops it.
    Returns (rows uint8 (N, 162), ratings int64 (N,), n_bad). Vectorized: a million rows take seconds."""
    size = os.path.getsize(path)  # FileNotFoundError names a missing file
    buf = np.zeros(size + 256, dtype=np.uint8)  # zero padding, so the fixed-width reads below never run off the end
    with open(path, "rb") as f:
        if f.readinto(buf[:size]) != size:
            raise OSError(f"{path}: file changed while reading")
    # line i spans buf[starts[i]:ends[i]], without its newline and without a '\r' before that
    newlines = np.flatnonzero(buf[:size] == ord("\n"))
    starts, ends = np.concatenate([[0], newlines + 1]), np.concatenate([newlines, [size]])
    ends -= (ends > starts) & (buf[np.maximum(ends - 1, 0)] == ord("\r"))
    header = buf[starts[0]:ends[0]].tobytes()
    if header.removeprefix(b"\xef\xbb\xbf").strip() != CSV_HEADER:  # also with a UTF-8 BOM
        found = header[:60].decode("utf-8", errors="replace")
        raise ValueError(f"{path}:1: expected the header '{CSV_HEADER.decode()}', found {found!r}")
    line_numbers = np.flatnonzero(ends > starts)[1:] + 1  # rows: not the header, nor empty lines (as at the end)
    starts, ends = starts[line_numbers - 1], ends[line_numbers - 1]
    n = len(starts)

    # the commas after the header, all in rows, give each row's fields; a row without exactly 3 reads garbage
    # positions below (inside the padded buffer) and fails the first check
    commas = np.flatnonzero(buf[len(header):size] == ord(",")) + len(header)
    n_commas = np.bincount(np.searchsorted(starts, commas, side="right") - 1, minlength=n)
    first = np.cumsum(n_commas) - n_commas
    commas = np.append(commas, [0, 0, 0])  # so rows with fewer commas still index somewhere
    question_start, answer_start, rating_start = commas[first] + 1, commas[first + 1] + 1, commas[first + 2] + 1
    question_len, answer_len = answer_start - question_start - 1, rating_start - answer_start - 1
    rating_len = ends - rating_start
    # each check runs once, over all rows; an error names the first check its row fails, in this order
    failed = {"fields": n_commas != 3, "question length": question_len != 81, "question": np.zeros(n, bool),
              "answer length": answer_len != 81, "answer": np.zeros(n, bool),
              "rating": (rating_len < 1) | (rating_len > 9), "solution": np.zeros(n, bool), "givens": np.zeros(n, bool)}

    # views of the 163 bytes from each position (question, comma, answer) and of the 9 from each position
    # (the rating): picking rows of these copies whole byte runs, much faster than an index per byte
    question_answer = np.lib.stride_tricks.sliding_window_view(buf, 163)
    rating_digits = np.lib.stride_tricks.sliding_window_view(buf, 9)
    rows, ratings = np.zeros((n, 162), dtype=np.uint8), np.zeros(n, dtype=np.int64)
    for lo in range(0, n, CHUNK_ROWS):
        chunk = slice(lo, lo + CHUNK_ROWS)
        fields = question_answer[question_start[chunk]]                                     # (C, 163)
        question, answer = QUESTION_BYTES[fields[:, :81]], ANSWER_BYTES[fields[:, 82:]]  # 255 = illegal
        in_rating = np.arange(9) < rating_len[chunk, None]                                  # (C, 9)
        digits = np.where(in_rating, rating_digits[rating_start[chunk]].astype(np.int64) - ord("0"), 0)
        # the k-th of a rating's len digits counts 10 ** (len - 1 - k); ratings longer than 9 fail anyway
        ratings[chunk] = (digits * 10 ** np.clip(rating_len[chunk, None] - 1 - np.arange(9), 0, 8)).sum(1)
        valid, consistent = check_grids(torch.from_numpy(question), torch.from_numpy(answer))
        failed["question"][chunk], failed["answer"][chunk] = (question == 255).any(1), (answer == 255).any(1)
        failed["rating"][chunk] |= ((digits < 0) | (digits > 9)).any(1)
        failed["solution"][chunk], failed["givens"][chunk] = ~valid.numpy(), ~consistent.numpy()
        rows[chunk, :81], rows[chunk, 81:] = question, answer

    bad = np.logical_or.reduce(list(failed.values()))
    n_bad = int(bad.sum())
    if n_bad and not skip_bad:
        i = int(np.argmax(bad))
        check = next(check for check, rows_failing in failed.items() if rows_failing[i])
        problem = _row_problem(check, buf[starts[i]:ends[i]].tobytes(), rows[i])
        raise ValueError(f"{path}:{line_numbers[i]}: {problem}")
    return (rows[~bad], ratings[~bad], n_bad) if n_bad else (rows, ratings, 0)


def _row_problem(check, line, row):
    """In words, why a CSV row (line, decoded into the 162 cells of row) failed load_csv's `check`."""
    fields, row = line.split(b","), row.tolist()
    if check == "fields":
        return f"expected 4 comma-separated fields (source,question,answer,rating), found {len(fields)}"
    if check == "rating":
        rating = fields[3].decode("utf-8", errors="replace")
        return f"rating {rating!r} is not a non-negative integer (at most 9 digits)"
    if check == "solution":
        return f"answer is not a valid sudoku solution ({find_conflicts(row[81:])[0]} repeats a digit)"
    if check == "givens":
        cell = next(cell for cell in range(81) if row[cell] not in (0, row[81 + cell]))
        return (f"answer has {row[81 + cell]} where the question gives {row[cell]} "
                f"(row {cell // 9 + 1}, column {cell % 9 + 1})")
    name = check.split()[0]  # question or answer
    text = fields[1] if name == "question" else fields[2]
    if check.endswith("length") and text.isascii():  # else a multi-byte character is the thing to name
        return f"{name} has {len(text)} cells, expected 81"
    allowed = QUESTION_CHARS if name == "question" else ANSWER_CHARS
    illegal = next(ch for ch in text.decode("utf-8", errors="replace") if ch not in allowed)
    return f"{name} has the illegal character {illegal!r}"

# -----------------------------------------------------------------------------
# downloading


def hf_url(filename):
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/datasets/sapientinc/sudoku-extreme/resolve/main/{filename}"


def download(url, dest):
    """Fetch url to dest via dest.part, resuming a partial .part; dest appears only when complete."""
    dest, part = Path(dest), Path(f"{dest}.part")
    if dest.exists():
        print(f"{dest} already there, not downloading")
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = done = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "nanoHRM-prepare_sudoku"}
    if os.environ.get("HF_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as response:
            if response.status != 206:
                have = done = 0  # the server ignored the Range header and sends the whole file
            size = response.headers.get("Content-Length")
            total = have + int(size) if size is not None else None
            last_print = 0.0
            with open(part, "ab" if have else "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    if time.time() - last_print > 0.5:
                        last_print = time.time()
                        of_total = f" of {total / 1e6:.1f}" if total else ""
                        print(f"\r{dest.name}: {done / 1e6:.1f}{of_total} MB", end="", file=sys.stderr, flush=True)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # our .part is no prefix of the file (did it change?): start over
            os.remove(part)
            return download(url, dest)
        raise
    except http.client.HTTPException as e:  # a garbled reply, or one cut off (IncompleteRead: .part stays, to resume)
        raise OSError(f"bad reply from the server after {done} bytes ({type(e).__name__})") from e
    print(f"\r{dest.name}: {done / 1e6:.1f} MB, done", file=sys.stderr)
    if total is not None and done != total:
        raise OSError(f"got {done} of {total} bytes; run again to resume")
    os.replace(part, dest)

# -----------------------------------------------------------------------------
# building a dataset (the command line)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line through main's error path instead of usage text and exit code 2
        raise ValueError(f"{message} (see --help)")


def _bool(text):
    if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return text.lower() in ("1", "true", "yes")


def parse_args(argv):
    parser = ArgumentParser(description="Prepare Sudoku data for nanoHRM (see the top of prepare_sudoku.py).")
    add = parser.add_argument
    add("--source", default=None, help="hf (default), generate, or a folder holding train.csv and test.csv")
    add("--train_csv", default=None, help="train CSV (with --test_csv), instead of --source")
    add("--test_csv", default=None)
    add("--cache_dir", default="data/cache/sudoku-extreme", help="where --source=hf downloads go")
    add("--out_dir", default="data/sudoku-extreme-1k")
    add("--subsample_size", type=int, default=1000, help="train puzzles kept, a random subset; 0 or -1 = all")
    add("--test_size", type=int, default=-1, help="test puzzles kept, a random subset; 0 or -1 = all")
    add("--min_rating", type=int, default=0, help="keep only puzzles rated at least this")
    add("--num_aug", type=int, default=0, help="augmented copies stored per train puzzle, besides the original")
    add("--seed", type=int, default=0)
    add("--skip_bad", type=_bool, nargs="?", const=True, default=False, help="drop bad CSV rows instead of failing")
    add("--n_train", type=int, default=1000, help="--source=generate: train puzzles")
    add("--n_test", type=int, default=1000, help="--source=generate: test puzzles")
    add("--min_givens", type=int, default=24, help="--source=generate: fewest givens")
    add("--max_givens", type=int, default=32, help="--source=generate: most givens")
    add("--workers", type=int, default=os.cpu_count() or 1, help="--source=generate: processes")
    add("--show", default=None, help="print a summary and a few puzzles of the prepared dataset in this folder")
    add("--show_n", type=int, default=3, help="puzzles per split that --show prints")
    args = parser.parse_args(argv)
    if args.source is not None and (args.train_csv or args.test_csv):
        raise ValueError("pass either --source or --train_csv/--test_csv, not both")
    if bool(args.train_csv) != bool(args.test_csv):
        raise ValueError("--train_csv and --test_csv go together")
    if not args.train_csv:
        args.source = args.source or "hf"
    lows = dict(subsample_size=-1, test_size=-1, min_rating=0, num_aug=0, n_train=1, n_test=1, workers=1, show_n=0)
    for name, low in lows.items():
        if getattr(args, name) < low:
            raise ValueError(f"--{name} must be at least {low}, got {getattr(args, name)}")
    return args


def load_sources(args):
    """Returns {split: (rows, ratings, source description, n_bad)} for train and test."""
    if args.source == "generate":
        rows, ratings = generate(args.n_train + args.n_test, args.min_givens, args.max_givens, args.seed, args.workers)
        source = f"generate(min_givens={args.min_givens}, max_givens={args.max_givens}, seed={args.seed})"
        n = args.n_train
        return {"train": (rows[:n], ratings[:n], source, 0), "test": (rows[n:], ratings[n:], source, 0)}
    if args.source not in (None, "hf") and not os.path.isdir(args.source):
        raise FileNotFoundError(f"--source={args.source}: no such folder (or use hf or generate)")
    sources = {}
    for split in ("train", "test"):
        url = hf_url(f"{split}.csv")
        if args.train_csv:
            path = args.train_csv if split == "train" else args.test_csv
        else:
            path = os.path.join(args.cache_dir if args.source == "hf" else args.source, f"{split}.csv")
        if args.source == "hf":
            try:
                download(url, path)
            except OSError as e:
                is_http = isinstance(e, urllib.error.HTTPError)
                reason = f"HTTP {e.code} {e.reason}" if is_http else getattr(e, "reason", e)
                raise OSError(f"could not download {url} ({reason}); offline? pass --source=DIR with train.csv "
                              "and test.csv, or --train_csv=/--test_csv=") from e
        t0 = time.time()
        rows, ratings, n_bad = load_csv(path, skip_bad=args.skip_bad)
        dropped = f", dropped {n_bad} bad rows" if n_bad else ""
        print(f"{path}: {len(rows)} puzzles in {time.time() - t0:.1f}s{dropped}")
        sources[split] = (rows, ratings, url if args.source == "hf" else os.path.abspath(path), n_bad)
    return sources


def _subset(n, size, seed):
    """Sorted indices of a random subset of range(n) of the given size (size 0 or -1: everything)."""
    if size <= 0 or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def _question_keys(rows):
    # each row's 81 question bytes as one opaque value, so numpy can compare whole puzzles
    return np.ascontiguousarray(rows[:, :81]).view(np.dtype((np.void, 81))).ravel()


def _counts(values):
    return {str(v): int(c) for v, c in zip(*np.unique(values, return_counts=True))}


def build(args):
    """Every step from the sources to the train and test arrays; returns (splits, meta)."""
    sources = load_sources(args)
    (train, train_ratings, _, _), (test, test_ratings, _, _) = sources["train"], sources["test"]
    # narrow down the indices of the rows to keep, so that each array is copied only once
    keep = np.flatnonzero(test_ratings >= args.min_rating)
    keep = keep[_subset(len(keep), args.test_size, [args.seed, 1])]
    test, test_ratings = test[keep], test_ratings[keep]
    keep = np.flatnonzero(train_ratings >= args.min_rating)
    # a train puzzle that is also a test puzzle would leak its answer: compare questions byte for byte
    leaked = np.isin(_question_keys(train[keep, :81]), _question_keys(test))
    if leaked.any():
        print(f"removed {leaked.sum()} train puzzles that are also in test")
    keep = keep[~leaked]
    keep = keep[_subset(len(keep), args.subsample_size, [args.seed, 0])]
    train, train_ratings = train[keep], train_ratings[keep]
    for split, rows in (("train", train), ("test", test)):
        if len(rows) == 0:
            raise ValueError(f"no {split} puzzles left (after --min_rating={args.min_rating}?)")
    n_originals = len(train)
    if args.num_aug > 0:  # random symmetric variants of every row, via the same augment() train.py applies
        generator = torch.Generator().manual_seed(args.seed)
        puzzles, solutions = torch.from_numpy(train[:, :81]), torch.from_numpy(train[:, 81:])
        copies = [torch.cat(augment(puzzles, solutions, generator), dim=1).numpy() for _ in range(args.num_aug)]
        train = np.concatenate([train] + copies)
        train_ratings = np.tile(train_ratings, args.num_aug + 1)  # a symmetry keeps a puzzle's logic and rating

    splits = {"train": (train, train_ratings), "test": (test, test_ratings)}
    meta = {"format": FORMAT}
    for split, (rows, ratings) in splits.items():
        rating_hist = _counts(ratings)
        if len(rating_hist) > 200:  # too many distinct ratings to list: use the shared bins
            counts = np.bincount(bin_index(ratings), minlength=len(RATING_BINS))
            rating_hist = {name: int(c) for (_, _, name), c in zip(RATING_BINS, counts)}
        meta[split] = {"count": len(rows), "rating_hist": rating_hist,
                       "givens_hist": _counts(np.count_nonzero(rows[:, :81], axis=1)),
                       "source": sources[split][2], "n_bad": sources[split][3]}
    meta["train"]["count_before_augmentation"] = n_originals
    meta["n_train_test_duplicates_removed"] = int(leaked.sum())
    meta["options"] = vars(args)
    return splits, meta


def write_dataset(out_dir, splits, meta):
    """Write everything into a fresh folder next to out_dir and swap it in only once it is complete."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        for split, (rows, ratings) in splits.items():
            rows, ratings = np.ascontiguousarray(rows, dtype=np.uint8), np.minimum(ratings, 65535).astype(np.uint16)
            for suffix, key, array in ((".bin", "sha256", rows), ("_rating.bin", "rating_sha256", ratings)):
                array.tofile(tmp / f"{split}{suffix}")
                meta[split][key] = hashlib.sha256(array).hexdigest()  # of the bytes just written
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if out_dir.exists():
            os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if old.exists():
                os.rename(old, out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only still there when something failed


def show(data_dir, n_show, seed):
    """Counts, histograms and a few puzzles of a prepared dataset, read from its memmaps and meta.json."""
    meta = read_meta(data_dir)
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        rows, ratings = read_split(data_dir, split), read_ratings(data_dir, split)
        if len(ratings) != len(rows):
            raise ValueError(f"{data_dir}: {split}_rating.bin has {len(ratings)} entries for {len(rows)} rows")
        givens = np.zeros(len(rows), dtype=np.int64)
        for i in range(0, len(rows), CHUNK_ROWS):  # in chunks: the memmap may not fit in memory
            givens[i:i + CHUNK_ROWS] = np.count_nonzero(rows[i:i + CHUNK_ROWS, :81], axis=1)
        bins = np.bincount(bin_index(ratings), minlength=len(RATING_BINS))
        print(f"{split}: {len(rows)} puzzles from {meta.get(split, {}).get('source', '?')}")
        print("  rating  " + "  ".join(f"{name}: {c}" for (_, _, name), c in zip(RATING_BINS, bins)))
        print("  givens  " + "  ".join(f"{v}: {c}" for v, c in _counts(givens).items()))
        for i in np.sort(rng.choice(len(rows), size=min(n_show, len(rows)), replace=False)):
            print(f"\n  {split} #{i}: rating {ratings[i]}, {givens[i]} givens")
            grids = format_side_by_side([rows[i, :81], rows[i, 81:]], ["puzzle", "solution"])
            print("\n".join("  " + line for line in grids.split("\n")))
        print()


def main(argv):
    args = parse_args(argv)
    if args.show:
        show(args.show, args.show_n, args.seed)
        return
    t0 = time.time()
    splits, meta = build(args)
    write_dataset(args.out_dir, splits, meta)
    counts = ", ".join(f"{split} {meta[split]['count']}" for split in splits)
    print(f"wrote {args.out_dir}: {counts} puzzles ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        print("\nerror: interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as e:
        print("error: " + " ".join(str(e).split("\n")), file=sys.stderr)
        sys.exit(1)
