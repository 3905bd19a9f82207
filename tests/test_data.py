"""
Tests for prepare_sudoku.py. Every check compares against references written here (a plain set-based
validity check, a brute-force solution counter, hand-written CSV rows), not against the code under test.
"""

import csv
import hashlib
import http.server
import importlib.util
import json
import os
import runpy
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import prepare_sudoku as ps  # noqa: E402

SCRIPT = REPO / "prepare_sudoku.py"
DIABOLICAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "diabolical"

EASY = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"   # the Wikipedia puzzle
HARD = "8..........36......7..9.2...5...7.......457.....1...3...1....68..85...1..9....4.."   # Arto Inkala's
# a valid solved grid built by a shifting pattern (row r is row 0 shifted by 3*(r%3) + r//3)
PATTERN = [(c + 3 * (r % 3) + r // 3) % 9 + 1 for r in range(9) for c in range(9)]
LATIN = "".join(str((r + c) % 9 + 1) for r in range(9) for c in range(9))  # rows and columns fine, boxes not

# -----------------------------------------------------------------------------
# independent references


def ref_units():
    rows = [[(r, c) for c in range(9)] for r in range(9)]
    cols = [[(r, c) for r in range(9)] for c in range(9)]
    boxes = [[(br + i, bc + j) for i in range(3) for j in range(3)] for br in (0, 3, 6) for bc in (0, 3, 6)]
    return [[r * 9 + c for r, c in unit] for unit in rows + cols + boxes]


REF_UNITS = ref_units()


def ref_valid(grid):
    grid = [int(v) for v in grid]
    return len(grid) == 81 and all({grid[i] for i in unit} == set(range(1, 10)) for unit in REF_UNITS)


def ref_agrees(puzzle, solution):
    return all(int(p) == 0 or int(p) == int(s) for p, s in zip(puzzle, solution))


def ref_solutions(puzzle, limit=2):
    """Plain backtracking, most constrained empty cell first; returns up to `limit` solutions."""
    grid = [int(v) for v in puzzle]
    peers = [set() for _ in range(81)]
    for unit in REF_UNITS:
        for i in unit:
            peers[i] |= set(unit) - {i}
    for i in range(81):
        if grid[i] and any(grid[j] == grid[i] for j in peers[i]):
            return []
    found = []

    def search():
        best = None
        for i in range(81):
            if grid[i] == 0:
                options = set(range(1, 10)) - {grid[j] for j in peers[i]}
                if best is None or len(options) < len(best[1]):
                    best = (i, options)
                if not options:
                    return
        if best is None:
            found.append(list(grid))
            return
        i, options = best
        for d in sorted(options):
            grid[i] = d
            search()
            grid[i] = 0
            if len(found) >= limit:
                return

    search()
    return found


def cells(text):
    return [0 if ch in ".0" else int(ch) for ch in text]


def guesses_to_solve(puzzle):
    """A puzzle's rating, the solver's guesses before its first solution, from a search that stops there
    (the generator takes it from its uniqueness check, a search for two solutions)."""
    return ps._solutions(puzzle, 1)[1]


def diabolical_rows(split, n):
    with open(DIABOLICAL / f"{split}.csv") as f:
        return [row for _, row in zip(range(n), csv.DictReader(f))]


def one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    return lines[0]


def run_script(*args, env=None, cwd=None):
    full_env = dict(os.environ, no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost", **(env or {}))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=120)


def run_main_block(argv, capsys):
    """Run the script's __main__ block in this process (no interpreter start-up); returns (exit code, stderr)."""
    old_argv = sys.argv
    sys.argv = [str(SCRIPT), *argv]
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old_argv
    return code, capsys.readouterr().err

# -----------------------------------------------------------------------------
# text and checks


def test_parse_and_format_grid():
    drawn = ps.format_grid(cells(EASY))
    lines = drawn.split("\n")
    assert len(lines) == 11 and lines[3] == lines[7] == "------+-------+------"
    assert lines[0] == "5 3 . | . 7 . | . . ."
    assert ps.parse_grid(drawn).tolist() == cells(EASY)       # the drawing parses back
    assert ps.parse_grid(EASY.replace(".", "0")).dtype == np.uint8
    assert ps.grid_to_string(cells(EASY)) == EASY
    side = ps.format_side_by_side([cells(EASY), PATTERN], ["puzzle", "solution"]).split("\n")
    assert side[0].startswith("puzzle") and "solution" in side[0] and len(side) == 12
    assert side[1] == lines[0] + "   " + "1 2 3 | 4 5 6 | 7 8 9"
    with pytest.raises(ValueError, match="found 80"):
        ps.parse_grid(EASY[:-1])
    with pytest.raises(ValueError, match="'x'"):
        ps.parse_grid(EASY[:-1] + "x")


def swapped(grid, i, j):
    grid = list(grid)
    grid[i], grid[j] = grid[j], grid[i]
    return grid


def test_find_conflicts():
    assert ref_valid(PATTERN) and ps.find_conflicts(PATTERN) == []
    assert set(ps.find_conflicts(swapped(PATTERN, 0, 1))) == {"column 1", "column 2"}  # the row stays fine
    assert set(ps.find_conflicts(swapped(PATTERN, 0, 9))) == {"row 1", "row 2"}        # the column stays fine
    assert ps.find_conflicts(cells(LATIN)) == [f"box {i}" for i in range(1, 10)]
    assert ps.find_conflicts(cells(EASY)) == []  # blanks are no conflict
    # a 5 put under the first cell's 5, into a row that has one already
    assert ps.find_conflicts(cells("5" + EASY[1:9] + "5" + EASY[10:])) == ["row 2", "column 1", "box 1"]
    assert ps.find_conflicts(torch.tensor(cells("11" + "." * 79))) == ["row 1", "box 1"]


def test_check_grids_matches_reference():
    solution = ref_solutions(cells(EASY))[0]
    blank = list(solution)
    blank[40] = 0
    preds = [solution, PATTERN, cells(LATIN), blank, [10] + solution[1:], swapped(PATTERN, 0, 1), [5] * 81]
    puzzles = torch.tensor([cells(EASY)] * len(preds))
    valid, consistent = ps.check_grids(puzzles, torch.tensor(preds, dtype=torch.uint8))
    assert valid.tolist() == [ref_valid(p) for p in preds] == [True, True, False, False, False, False, False]
    assert consistent.tolist() == [ref_agrees(cells(EASY), p) for p in preds]
    # valid grids with a few cells changed to anything from -1 to 11, or two cells swapped, in any integer dtype
    n = 2000
    g = torch.Generator().manual_seed(7)
    grids = ps.augment(torch.tensor([PATTERN] * n), torch.tensor([PATTERN] * n), generator=g)[0]
    changed = torch.rand(n, 81, generator=g) < torch.rand(n, 1, generator=g) * 0.03
    grids = torch.where(changed, torch.randint(-1, 12, (n, 81), generator=g), grids)
    i, j = torch.randint(0, 81, (2, n), generator=g)
    rows = torch.arange(n)[torch.rand(n, generator=g) < 0.3]
    grids[rows, i[rows]], grids[rows, j[rows]] = grids[rows, j[rows]], grids[rows, i[rows]]
    puzzles = grids * (torch.rand(n, 81, generator=g) < 0.3)
    puzzles[::7, 5] = 1  # some givens the grid may not keep
    expected_valid = [ref_valid(grid) for grid in grids.tolist()]
    assert 0.2 < sum(expected_valid) / n < 0.8
    for dtype in (torch.int64, torch.int32, torch.int16):
        valid, consistent = ps.check_grids(puzzles.to(dtype), grids.to(dtype))
        assert valid.tolist() == expected_valid
        assert consistent.tolist() == [ref_agrees(p, s) for p, s in zip(puzzles.tolist(), grids.tolist())]
    assert [x.shape for x in ps.check_grids(puzzles[:0], grids[:0])] == [(0,), (0,)]

# -----------------------------------------------------------------------------
# solver and generator


def test_solve_counts_like_brute_force():
    changed = cells(EASY)
    changed[0] = 1  # 5 -> 1: no given repeats, yet the puzzle has no solution
    fewer = cells(EASY)
    for i in [i for i, d in enumerate(fewer) if d][:12]:
        fewer[i] = 0
    cases = [cells(EASY), [0] * 81, cells("11" + "." * 79), changed, fewer, cells(ps.grid_to_string(PATTERN))]
    for puzzle in cases + [cells(HARD)]:
        expected = ref_solutions(puzzle, limit=2)
        found = ps._solutions(puzzle, 2)[0]
        assert len(found) == len(expected)
        for solution in found:
            assert ref_valid(solution) and ref_agrees(puzzle, solution)
        if len(found) == 1:
            assert found == expected
        assert ps._solutions(puzzle, 1)[0] == found[:1]
    assert len(ps._solutions([0] * 81, 5)[0]) == 5 and len(ps._solutions(cells(EASY), 5)[0]) == 1


def test_rating_easy_and_hard():
    near_complete = list(PATTERN)
    for i in (0, 10, 20, 40, 80):
        near_complete[i] = 0
    assert guesses_to_solve(near_complete) == 0
    assert guesses_to_solve(cells(EASY)) == 0  # naked and hidden singles solve it
    assert guesses_to_solve(cells(HARD)) > 0


@pytest.mark.parametrize("n, min_givens, max_givens, seed", [(10, 20, 26, 1), (20, 30, 40, 2)])
def test_generate_unique_puzzles(n, min_givens, max_givens, seed):
    rows, ratings = ps.generate(n, min_givens, max_givens, seed=seed, progress=False)
    assert rows.shape == (n, 162) and rows.dtype == np.uint8 and ratings.shape == (n,)
    for row, rating in zip(rows, ratings):
        puzzle, solution = row[:81].tolist(), row[81:].tolist()
        assert min_givens <= sum(1 for d in puzzle if d) <= max_givens
        assert ref_valid(solution)
        assert ref_solutions(puzzle, limit=2) == [solution]
        assert rating == guesses_to_solve(puzzle)  # the rating of the final puzzle, not of an earlier one
    assert len({bytes(row) for row in rows}) == n
    assert len({bytes(row[81:]) for row in rows}) == n  # a fresh grid for every puzzle


def test_generate_same_for_any_worker_count():
    one, ratings_one = ps.generate(12, 28, 36, seed=7, workers=1, progress=False)
    two, ratings_two = ps.generate(12, 28, 36, seed=7, workers=2, progress=False)
    other, _ = ps.generate(12, 28, 36, seed=8, workers=1, progress=False)
    assert (one == two).all() and (ratings_one == ratings_two).all()
    assert not (one == other).all()
    with pytest.raises(ValueError):
        ps.generate(1, 16, 20, seed=0, progress=False)

# -----------------------------------------------------------------------------
# augmentation


def solved_grids():
    return [cells(row["answer"]) for row in diabolical_rows("test", 20)] if DIABOLICAL.exists() else [PATTERN]


def test_augment_keeps_puzzles_valid():
    n = 2000
    g = torch.Generator().manual_seed(0)
    grids = torch.tensor(solved_grids(), dtype=torch.uint8)
    solutions = grids[torch.arange(n) % len(grids)]
    puzzles = solutions * (torch.rand(n, 81, generator=g) < 0.35)  # random givens
    new_puzzles, new_solutions = ps.augment(puzzles, solutions, generator=g)
    assert new_puzzles.dtype == torch.uint8 and new_puzzles.shape == (n, 81)
    for p, s in zip(new_puzzles.tolist(), new_solutions.tolist()):
        assert ref_valid(s) and ref_agrees(p, s)
    assert ((new_puzzles > 0).sum(1) == (puzzles > 0).sum(1)).all()
    # the same start grid comes out in many different ways
    same_start = [bytes(s) for s, i in zip(new_solutions.numpy(), range(n)) if i % len(grids) == 0]
    assert len(set(same_start)) > 0.95 * len(same_start)


def test_augment_cell_map_is_a_bijection():
    # label each cell by (its row, its column): digit relabelling is a bijection, so the 81 output pairs
    # (relabelled row, relabelled column) are all distinct exactly when no source cell is used twice
    n = 2000
    row_of = torch.tensor([r + 1 for r in range(9) for c in range(9)]).repeat(n, 1)
    col_of = torch.tensor([c + 1 for r in range(9) for c in range(9)]).repeat(n, 1)
    out_rows, out_cols = ps.augment(row_of, col_of, generator=torch.Generator().manual_seed(1))
    pairs = (out_rows * 10 + out_cols).sort(dim=1).values
    assert (pairs[:, 1:] != pairs[:, :-1]).all()
    # rows move as whole rows: without transpose an output row has one source row, with it an output column
    grid = out_rows.view(n, 9, 9)
    along_rows = (grid == grid[:, :, :1]).all(dim=2).all(dim=1)
    along_cols = (grid == grid[:, :1, :]).all(dim=1).all(dim=1)
    assert (along_rows ^ along_cols).all()
    assert 0.4 < along_cols.float().mean() < 0.6  # transposed about half the time


def test_augment_uses_every_symmetry():
    # one given at the top-left corner: reaching all 81 cells needs band, row, stack and column moves,
    # and its digit shows whether the relabelling really permutes
    n = 2000
    puzzles = torch.zeros(n, 81, dtype=torch.long)
    puzzles[:, 0] = 1
    solutions = torch.tensor([PATTERN] * n)
    out, _ = ps.augment(puzzles, solutions, generator=torch.Generator().manual_seed(2))
    assert ((out > 0).sum(1) == 1).all()
    assert set(out.argmax(1).tolist()) == set(range(81))
    assert set(out.max(1).values.tolist()) == set(range(1, 10))


def test_augment_follows_generator():
    puzzles = torch.tensor([PATTERN] * 64)
    a = ps.augment(puzzles, puzzles, generator=torch.Generator().manual_seed(3))[0]
    b = ps.augment(puzzles, puzzles, generator=torch.Generator().manual_seed(3))[0]
    c = ps.augment(puzzles, puzzles, generator=torch.Generator().manual_seed(4))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ps.augment(puzzles[:0], puzzles[:0])[0].shape == (0, 81)


def test_reveal_fills_blanks_from_the_solution_up_to_min_givens():
    n = 3000
    g = torch.Generator().manual_seed(6)
    grids = torch.tensor(solved_grids(), dtype=torch.uint8)
    solutions = grids[torch.arange(n) % len(grids)]
    puzzles = solutions * (torch.rand(n, 81, generator=g) < torch.rand(n, 1, generator=g))  # 0..81 givens
    for min_givens in (17, 30, 45, 81):
        out = ps.reveal(puzzles, solutions, min_givens, generator=g)
        before, after = (puzzles > 0).sum(1), (out > 0).sum(1)
        assert out.dtype == puzzles.dtype
        assert torch.equal(after, torch.maximum(before, torch.tensor(min_givens)))  # exactly as many as it says
        assert ((out == puzzles) | (puzzles == 0)).all()                            # no given changes
        assert ((out == solutions) | (out == 0)).all()                              # revealed cells are the solution's
    # which blanks get revealed is random: over many draws of one puzzle, every blank is revealed sometimes
    one = puzzles[:1].repeat(500, 1) * 0
    hits = (ps.reveal(one, solutions[:1].repeat(500, 1), 20, generator=g) > 0).float().mean(0)
    assert hits.min() > 0.1 and abs(hits.mean().item() - 20 / 81) < 1e-6


def test_invert_symmetry_round_trip():
    # 10,000 random symmetries of random boards (digits and blanks): inverting the transform gives back
    # the board, cell for cell; and a symmetry that is not the identity does move something
    n = 10000
    g = torch.Generator().manual_seed(5)
    grids = torch.randint(0, 10, (n, 81), generator=g, dtype=torch.uint8)
    symmetry = ps.random_symmetry(n, generator=g)
    moved = ps.apply_symmetry(grids, symmetry)
    back = ps.invert_symmetry(moved, symmetry)
    assert back.dtype == torch.uint8 and torch.equal(back, grids)
    assert (moved != grids).any(dim=1).float().mean() > 0.99
    # the inverse of a solved grid's transform is checked by an independent loop over the cells
    index, digits = symmetry
    for i in range(5):
        expect = [0] * 81
        for cell in range(81):
            expect[int(index[i, cell])] = int(digits[i].tolist().index(int(moved[i, cell])))
        assert back[i].tolist() == expect
    identity = ps.identity_symmetry(3)
    assert torch.equal(ps.apply_symmetry(grids[:3], identity), grids[:3])


def test_rating_bins():
    ratings = np.array([0, 1, 2, 3, 9, 10, 29, 30, 5000])
    expected = ["0", "1-2", "1-2", "3-9", "3-9", "10-29", "10-29", "30+", "30+"]
    names = [name for _, _, name in ps.RATING_BINS]
    assert [names[i] for i in ps.bin_index(ratings)] == expected
    assert [names[i] for i in ps.bin_index(torch.tensor(ratings)).tolist()] == expected
    names = [name for _, _, name in ps.GIVENS_BINS]
    which = ps.bin_index(np.array([16, 17, 25, 26, 40, 41, 81]), ps.GIVENS_BINS)
    assert [names[i] if i >= 0 else None for i in which] == [None, "17-21", "22-25", "26-29", "35-40", "41+", "41+"]

# -----------------------------------------------------------------------------
# CSV loading


def good_rows(n):
    """(question, answer, rating) triples: real ones if the shared data is there, else made here."""
    if DIABOLICAL.exists():
        return [(r["question"], r["answer"], r["rating"]) for r in diabolical_rows("train", n)]
    answer = ps.grid_to_string(PATTERN)
    return [(answer[:i] + "." + answer[i + 1:], answer, str(i)) for i in range(n)]


def write_csv(path, rows, header="source,question,answer,rating", newline="\n"):
    lines = [header] + [",".join(("test",) + tuple(row)) if isinstance(row, tuple) else row for row in rows]
    path.write_bytes((newline.join(lines) + newline).encode())
    return path


def decoded(triples):
    return np.array([cells(q) + cells(a) for q, a, _ in triples], dtype=np.uint8)


def test_load_csv_good_rows(tmp_path):
    triples = good_rows(30)
    triples[3] = (triples[3][0].replace(".", "0"), triples[3][1], triples[3][2])  # '0' blanks work too
    for newline in ("\n", "\r\n"):
        rows, ratings, n_bad = ps.load_csv(write_csv(tmp_path / "good.csv", triples, newline=newline))
        assert n_bad == 0 and rows.dtype == np.uint8
        assert (rows == decoded(triples)).all()
        assert ratings.tolist() == [int(r) for _, _, r in triples]


def bad_variants():
    q, a, r = good_rows(1)[0]
    first_given = next(i for i, ch in enumerate(q) if ch != ".")
    other_digit = str(int(q[first_given]) % 9 + 1)
    blanks = [i for i, ch in enumerate(q) if ch == "."]
    i, j = blanks[0], next(j for j in blanks if j // 9 == blanks[0] // 9 and j != blanks[0]
                           and a[j] != a[blanks[0]])
    swapped = list(a)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    return {
        "short question": ((q[:-1], a, r), "question has 80 cells"),
        "long answer": ((q, a + "1", r), "answer has 82 cells"),
        "illegal char": ((q[:5] + "x" + q[6:], a, r), "illegal character 'x'"),
        "blank in answer": ((q, a[:-1] + ".", r), "illegal character '.'"),
        "answer not valid": ((q, "".join(swapped), r), "not a valid sudoku solution"),
        "answer breaks a box": (("." * 81, LATIN, r), "not a valid sudoku solution"),
        "disagrees with a given": ((q[:first_given] + other_digit + q[first_given + 1:], a, r),
                                   "where the question gives"),
        "rating not a number": ((q, a, "hard"), "rating 'hard'"),
        "negative rating": ((q, a, "-1"), "rating '-1'"),
        "empty rating": ((q, a, ""), "rating ''"),
        "extra field": ((q, a, r, "x"), "expected 4 comma-separated fields"),
        "missing field": (f"test,{q},{a}", "expected 4 comma-separated fields"),
        "non-ASCII character": ((q[:5] + "\u00e9" + q[6:], a, r), "illegal character '\u00e9'"),
    }


@pytest.mark.parametrize("kind", list(bad_variants()))
def test_load_csv_bad_row_names_file_and_line(tmp_path, kind):
    bad, reason = bad_variants()[kind]
    path = write_csv(tmp_path / "bad.csv", good_rows(3) + [bad] + good_rows(2))
    with pytest.raises(ValueError) as error:
        ps.load_csv(path)
    assert str(error.value).startswith(f"{path}:5: ")  # header is line 1, the bad row line 5
    assert reason in str(error.value)


def test_load_csv_bad_header_and_skip_bad(tmp_path):
    with pytest.raises(ValueError, match=":1: expected the header"):
        ps.load_csv(write_csv(tmp_path / "h.csv", good_rows(2), header="question,answer"))
    variants = [bad for bad, _ in bad_variants().values()]
    mixed = good_rows(4) + variants
    rows, ratings, n_bad = ps.load_csv(write_csv(tmp_path / "mixed.csv", mixed), skip_bad=True)
    assert n_bad == len(variants) and (rows == decoded(good_rows(4))).all()
    with pytest.raises(FileNotFoundError):
        ps.load_csv(tmp_path / "missing.csv")
    rows, ratings, n_bad = ps.load_csv(write_csv(tmp_path / "empty.csv", []))
    assert rows.shape == (0, 162) and ratings.shape == (0,) and n_bad == 0

# -----------------------------------------------------------------------------
# building datasets


def make_source_dir(tmp_path, n_train=40, n_test=12):
    """train.csv and test.csv, where train also holds a copy of test row 0 (a leak to be removed)."""
    triples = good_rows(n_train + n_test)
    train, test = triples[:n_train], triples[n_train:]
    source = tmp_path / "src"
    source.mkdir()
    write_csv(source / "train.csv", train[:5] + [test[0]] + train[5:])
    write_csv(source / "test.csv", test)
    return source, train, test


def givens_hist(rows):
    return {str(k): v for k, v in Counter(int((row[:81] > 0).sum()) for row in rows).items()}


def test_build_round_trip(tmp_path, capsys):
    source, train, test = make_source_dir(tmp_path)
    out = tmp_path / "out"
    ps.main([f"--source={source}", "--subsample_size=0", f"--out_dir={out}"])
    for split, triples in (("train", train), ("test", test)):
        rows, ratings = ps.read_split(out, split), ps.read_ratings(out, split)
        assert isinstance(rows, np.memmap) and rows.shape == (len(triples), 162)
        assert (np.asarray(rows) == decoded(triples)).all()  # original order, leaked row gone
        assert ratings.dtype == np.uint16 and ratings.tolist() == [int(r) for _, _, r in triples]
        meta = ps.read_meta(out)[split]
        assert meta["count"] == len(triples) and meta["n_bad"] == 0
        assert meta["sha256"] == hashlib.sha256((out / f"{split}.bin").read_bytes()).hexdigest()
        assert meta["rating_hist"] == {str(k): v for k, v in Counter(int(r) for _, _, r in triples).items()}
        assert meta["givens_hist"] == givens_hist(decoded(triples))
    meta = ps.read_meta(out)
    assert meta["n_train_test_duplicates_removed"] == 1 and "uint8" in meta["format"]
    assert meta["options"]["subsample_size"] == 0
    assert "removed 1 train puzzles" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]  # no temporary folders left behind


def test_build_subsample_filter_and_augment(tmp_path):
    source, train, test = make_source_dir(tmp_path)
    ratings = [int(r) for _, _, r in train]
    min_rating = sorted(ratings)[len(ratings) // 2]
    out = tmp_path / "out"
    args = [f"--source={source}", f"--out_dir={out}", f"--min_rating={min_rating}", "--subsample_size=10",
            "--test_size=5", "--num_aug=2", "--seed=3"]
    ps.main(args)
    rows, kept_ratings = np.asarray(ps.read_split(out, "train")), ps.read_ratings(out, "train")
    assert len(rows) == 30 and len(ps.read_split(out, "test")) == min(5, sum(int(r) >= min_rating for _, _, r in test))
    assert (kept_ratings >= min_rating).all()
    originals = rows[:10]
    allowed = {bytes(row) for row, r in zip(decoded(train), ratings) if r >= min_rating}
    assert all(bytes(row) in allowed for row in originals)
    for k in (1, 2):  # each copy block is a symmetric variant of the originals, row by row
        for original, copy in zip(originals, rows[10 * k:10 * (k + 1)]):
            assert ref_valid(copy[81:]) and ref_agrees(copy[:81], copy[81:])
            assert (copy[:81] > 0).sum() == (original[:81] > 0).sum()
    first = (out / "train.bin").read_bytes()
    ps.main(args)  # same seed, same dataset; the old one is replaced
    assert (out / "train.bin").read_bytes() == first
    ps.main(args[:-1] + ["--seed=4"])  # another seed picks another subset
    assert {bytes(row) for row in ps.read_split(out, "train")[:10]} != {bytes(row) for row in originals}


def test_build_from_generator(tmp_path):
    out = tmp_path / "out"
    ps.main(["--source=generate", "--n_train=20", "--n_test=8", "--min_givens=30", "--max_givens=36",
             "--workers=1", f"--out_dir={out}"])
    meta = ps.read_meta(out)
    assert meta["train"]["count"] == 20 and meta["test"]["count"] == 8
    for row in ps.read_split(out, "test"):
        assert 30 <= (row[:81] > 0).sum() <= 36 and ref_solutions(row[:81]) == [row[81:].tolist()]


@pytest.mark.parametrize("argv, message", [
    (["--source=generate", "--min_givens=16"], "min_givens"),
    (["--source=generate", "--min_givens=30", "--max_givens=25"], "max_givens"),
    (["--source=NOPE"], "no such folder"),
    (["--seed=abc"], "invalid int"),
    (["--subsample_size=-5"], "subsample_size"),
    (["--train_csv=a.csv"], "--test_csv"),
    (["--show=NOPE"], "not found"),
])
def test_bad_options_give_one_error_line(tmp_path, capsys, argv, message):
    argv = [a.replace("NOPE", str(tmp_path / "nope")) for a in argv]
    code, stderr = run_main_block(argv + [f"--out_dir={tmp_path / 'out'}"], capsys)
    assert code == 1 and message in one_error_line(stderr)
    assert not (tmp_path / "out").exists()


def test_cli_bad_row_leaves_no_output(tmp_path):
    source, _, _ = make_source_dir(tmp_path)
    bad, _ = bad_variants()["answer not valid"]
    write_csv(source / "test.csv", good_rows(3) + [bad])
    out = tmp_path / "out"
    out.mkdir()
    (out / "marker").write_text("an earlier dataset")
    result = run_script(f"--source={source}", f"--out_dir={out}")
    assert result.returncode == 1
    assert f"{source / 'test.csv'}:5:" in one_error_line(result.stderr)
    assert os.listdir(out) == ["marker"]  # the earlier dataset is untouched
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]

# -----------------------------------------------------------------------------
# downloading


@pytest.fixture
def server(monkeypatch):
    """A loopback HTTP server with Range support; .files maps paths to bytes, .requests logs headers."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    state = {"files": {}, "requests": [], "honour_range": True}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state["requests"].append((self.path, dict(self.headers)))
            body = state["files"].get(self.path)
            if body is None:
                self.send_error(404)
                return
            start = 0
            if self.headers.get("Range") and state["honour_range"]:
                start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(body[start:])

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


def test_download_full_resume_and_token(tmp_path, server, monkeypatch):
    body = bytes(range(256)) * 40
    server["files"]["/f.csv"] = body
    dest = tmp_path / "f.csv"
    monkeypatch.setenv("HF_TOKEN", "secret")
    ps.download(server["url"] + "/f.csv", dest)
    assert dest.read_bytes() == body and not (tmp_path / "f.csv.part").exists()
    assert server["requests"][-1][1].get("Authorization") == "Bearer secret"
    ps.download(server["url"] + "/f.csv", dest)  # already there: no request
    assert len(server["requests"]) == 1
    monkeypatch.delenv("HF_TOKEN")
    for honour_range in (True, False):  # a server that ignores Range answers 200: start over
        server["honour_range"] = honour_range
        dest.unlink()
        (tmp_path / "f.csv.part").write_bytes(body[:1000])
        ps.download(server["url"] + "/f.csv", dest)
        assert dest.read_bytes() == body
        assert server["requests"][-1][1].get("Range") == "bytes=1000-"
        assert "Authorization" not in server["requests"][-1][1]
    with pytest.raises(OSError):
        ps.download(server["url"] + "/missing.csv", tmp_path / "missing.csv")
    assert not (tmp_path / "missing.csv").exists()


def test_hf_url(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert ps.hf_url("train.csv") == "https://huggingface.co/datasets/sapientinc/sudoku-extreme/resolve/main/train.csv"
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror/")
    assert ps.hf_url("test.csv") == "http://mirror/datasets/sapientinc/sudoku-extreme/resolve/main/test.csv"


def test_cli_hf_source_end_to_end(tmp_path, server):
    triples = good_rows(30)
    write_csv(tmp_path / "train.csv", triples[:20])
    write_csv(tmp_path / "test.csv", triples[20:])
    for name in ("train.csv", "test.csv"):
        server["files"][f"/datasets/sapientinc/sudoku-extreme/resolve/main/{name}"] = (tmp_path / name).read_bytes()
    out = tmp_path / "out"
    result = run_script("--subsample_size=0", f"--cache_dir={tmp_path / 'cache'}", f"--out_dir={out}",
                        env={"HF_ENDPOINT": server["url"]})
    assert result.returncode == 0, result.stderr
    assert (np.asarray(ps.read_split(out, "train")) == decoded(triples[:20])).all()
    assert (np.asarray(ps.read_split(out, "test")) == decoded(triples[20:])).all()
    assert (tmp_path / "cache" / "train.csv").read_bytes() == (tmp_path / "train.csv").read_bytes()


def test_cli_offline_error(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    result = run_script(f"--cache_dir={tmp_path / 'cache'}", f"--out_dir={out}",
                        env={"HF_ENDPOINT": f"http://127.0.0.1:{port}"})
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert line.startswith("error: could not download") and "offline?" in line and "--source=DIR" in line
    assert not out.exists()

# -----------------------------------------------------------------------------
# the real data, and the explorer


@pytest.mark.skipif(not DIABOLICAL.exists(), reason="needs ../shared/data/diabolical")
def test_cli_real_data_and_show(tmp_path, capsys):
    out = tmp_path / "out"
    result = run_script(f"--source={DIABOLICAL}", "--subsample_size=200", "--test_size=100", f"--out_dir={out}")
    assert result.returncode == 0, result.stderr
    train, test = np.asarray(ps.read_split(out, "train")), np.asarray(ps.read_split(out, "test"))
    assert train.shape == (200, 162) and test.shape == (100, 162)
    with open(DIABOLICAL / "train.csv") as f:
        source = {q: a for q, a in ((r["question"], r["answer"]) for r in csv.DictReader(f))}
    for row in train[:50]:
        question = ps.grid_to_string(row[:81])
        assert source[question] == "".join(map(str, row[81:]))
    meta = json.loads((out / "meta.json").read_text())
    assert sum(meta["train"]["givens_hist"].values()) == 200

    capsys.readouterr()
    ps.main([f"--show={out}", "--show_n=2"])
    text = capsys.readouterr().out
    assert "train: 200 puzzles" in text and "test: 100 puzzles" in text
    assert "rating  0:" in text and "30+:" in text and "givens" in text
    assert text.count("------+-------+------   ------+-------+------") == 2 * 2 * 2
    assert text.count("puzzle") >= 4 and "solution" in text


def test_import_has_no_side_effects(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("prepare_sudoku_fresh", SCRIPT)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert capsys.readouterr() == ("", "") and os.listdir(tmp_path) == []
