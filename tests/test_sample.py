"""
End-to-end tests of sample.py on a tiny checkpoint trained once per session (paper mode: act='q').
The model is barely trained, so its answers are mostly wrong: the tests check that what sample.py
reports about an answer (valid, consistent, accuracy, segments) matches an independent check of that
answer, not that the answer is right. Invocations are started together to share the start-up time.
One test drives sample.solve_all in process with a stand-in model.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prepare_sudoku as sudoku
import sample
from model import Solution

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = str(ROOT / 'sample.py')
HALT_MAX_STEPS = 3
TINY = ['--hidden_size=32', '--num_heads=2', '--H_layers=1', '--L_layers=1', '--H_cycles=1', '--L_cycles=2',
        f'--halt_max_steps={HALT_MAX_STEPS}', '--global_batch_size=16', '--warmup_iters=5', '--lr=1e-3',
        '--puzzle_emb_lr=1e-3', '--log_interval=5', '--eval_max_puzzles=32', '--compile=False', '--device=cpu',
        '--act=q', '--max_iters=10']
EXAMPLE = '53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79'


def run_env():
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')


def ok(result):
    assert result.returncode == 0, \
        f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert 'Traceback' not in result.stderr, result.stderr
    return result


def run_all(cases, out_dir):
    """{name: (args, stdin text or None)} -> {name: CompletedProcess}, all started at once."""
    procs = {}
    for name, (args, stdin) in cases.items():
        command = [sys.executable, SAMPLE, f'--out_dir={out_dir}', *args]
        procs[name] = (command, subprocess.Popen(command, cwd=ROOT, env=run_env(), text=True, stdin=subprocess.PIPE,
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE), stdin)
    results = {}
    for name, (command, proc, stdin) in procs.items():
        stdout, stderr = proc.communicate(stdin or '', timeout=300)
        results[name] = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    return results


# an independent checker ------------------------------------------------------------------------------

def normalize(text):
    """81 characters, '.' for blanks, from any accepted puzzle text."""
    cells = [ch for ch in text if ch in '0123456789.']
    assert len(cells) == 81
    return ''.join('.' if ch in '0.' else ch for ch in cells)


def check(puzzle, answer):
    """(valid, consistent) of an answer string: valid = every row, column and box holds 1..9 once;
    consistent = every given of the puzzle is kept."""
    grid = [answer[r * 9:r * 9 + 9] for r in range(9)]
    units = [list(row) for row in grid]
    units += [[grid[r][c] for r in range(9)] for c in range(9)]
    units += [[grid[r][c] for r in range(br, br + 3) for c in range(bc, bc + 3)]
              for br in (0, 3, 6) for bc in (0, 3, 6)]
    valid = all(sorted(unit) == list('123456789') for unit in units)
    consistent = all(p == '.' or p == a for p, a in zip(puzzle, answer))
    return valid, consistent


def drawing(puzzle):
    """The puzzle as a boxed grid with '|', '-', '+', spaces and newlines."""
    lines = []
    for r in range(9):
        if r in (3, 6):
            lines.append('------+-------+------')
        row = puzzle[r * 9:r * 9 + 9]
        lines.append(' | '.join(' '.join(row[c:c + 3]) for c in (0, 3, 6)))
    return '\n'.join(lines)


def answer_from_text(stdout):
    """The 'HRM answer' grid (right of the puzzle) from sample.py's side-by-side printout."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('puzzle') and 'HRM answer' in line) + 1
    grid_lines = [line for line in lines[start:start + 11] if not line.startswith('---')]
    return ''.join(ch for line in grid_lines for ch in line[21:] if ch in '123456789.')


STATUS = re.compile(r'valid sudoku: (yes|NO) \| keeps every given: (yes|NO) \| segments: (\d+)')


# fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def checkpoint(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('sample-ckpt')
    ok(subprocess.run([sys.executable, 'train.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}'],
                      cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300))
    return out


@pytest.fixture(scope='module')
def test_puzzles(data_dir):
    rows = sudoku.read_split(data_dir, 'test')[:8]
    ratings = sudoku.read_ratings(data_dir, 'test')[:8]
    return [(sudoku.grid_to_string(r[:81]), ''.join(str(d) for d in r[81:]), int(rating))
            for r, rating in zip(rows, ratings)]


@pytest.fixture(scope='module')
def good(checkpoint, test_puzzles, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('sample-inputs')
    p = [q for q, _, _ in test_puzzles]
    text_file = tmp / 'puzzles.txt'
    # one puzzle a line, in three spellings, with a blank line between
    text_file.write_text(f"{p[1]}\n\n{p[2].replace('.', '0')}\n{' | '.join(p[3][i:i + 9] for i in range(0, 81, 9))}\n")
    csv_file = tmp / 'test.csv'
    csv_file.write_text('source,question,answer,rating\n' + ''.join(f'gen,{q},{a},{r}\n' for q, a, r in test_puzzles))
    cases = {
        'zeros': ([f"--puzzle={p[0].replace('.', '0')}"], None),
        'drawing': ([f'--puzzle={drawing(p[0])}'], None),
        'example': (['--json', '--segments=2'], None),
        'file': (['--json', f'--file={text_file}'], None),
        'stdin': (['--json', '--file=-'], text_file.read_text()),
        'csv json': (['--json', f'--file={csv_file}'], None),
        'csv': ([f'--file={csv_file}'], None),
        'trace': (['--trace', f'--puzzle={p[0]}'], None),  # also the '.' spelling of p[0]
        'views': (['--json', '--views=4', '--check=False', '--segments=2', f'--file={csv_file}'], None),
        'views trace': (['--trace', '--views=3', f'--puzzle={p[0]}'], None),
        'restart': (['--views=2', '--restart=1', '--hints=2', '--segments=3', f'--file={csv_file}'], None),
    }
    results = run_all(cases, checkpoint)
    for result in results.values():
        ok(result)
    return results


# good input ---------------------------------------------------------------------------------------------

def test_puzzle_spellings_all_accepted_and_give_the_same_answer(good, test_puzzles):
    puzzle = test_puzzles[0][0]
    answers = []
    for name in ('trace', 'zeros', 'drawing'):
        stdout = good[name].stdout
        assert 'HRM answer' in stdout
        assert ' | '.join(' '.join(puzzle[c:c + 3]) for c in (0, 3, 6)) in stdout  # the puzzle's first row, drawn
        status = STATUS.search(stdout)
        assert status, stdout
        answer = answer_from_text(stdout)
        assert len(answer) == 81
        valid, consistent = check(puzzle, answer)
        assert status.group(1) == ('yes' if valid else 'NO') and status.group(2) == ('yes' if consistent else 'NO')
        assert 1 <= int(status.group(3)) <= HALT_MAX_STEPS
        answers.append(answer)
    assert answers[0] == answers[1] == answers[2]  # the same puzzle, however it is written


def test_built_in_example_json(good):
    objects = [json.loads(line) for line in good['example'].stdout.splitlines()]
    assert len(objects) == 1
    obj = objects[0]
    assert set(obj) == {'puzzle', 'solution', 'valid', 'consistent', 'steps', 'view'}
    assert re.fullmatch('[1-9]{81}', obj['solution'])  # always digits, however weak the model
    assert obj['puzzle'] == EXAMPLE
    assert obj['steps'] == 2  # --segments=2 runs exactly two
    assert (obj['valid'], obj['consistent']) == check(EXAMPLE, obj['solution'])


def test_file_and_stdin_one_puzzle_a_line(good, test_puzzles):
    objects = [json.loads(line) for line in good['file'].stdout.splitlines()]
    assert [o['puzzle'] for o in objects] == [test_puzzles[i][0] for i in (1, 2, 3)]
    for o in objects:
        assert (o['valid'], o['consistent']) == check(o['puzzle'], o['solution'])
        assert 1 <= o['steps'] <= HALT_MAX_STEPS
    assert good['stdin'].stdout == good['file'].stdout  # the same puzzles through stdin


def test_dataset_csv_reports_accuracy(good, test_puzzles):
    objects = [json.loads(line) for line in good['csv json'].stdout.splitlines()]
    assert [o['puzzle'] for o in objects] == [q for q, _, _ in test_puzzles]
    exact = sum(o['solution'] == a for o, (_, a, _) in zip(objects, test_puzzles))
    valid = sum(check(o['puzzle'], o['solution'])[0] for o in objects)
    for o in objects:
        assert (o['valid'], o['consistent']) == check(o['puzzle'], o['solution'])
    # with --json the summary goes to stderr, so stdout stays one JSON object a line
    summary = good['csv json'].stderr
    assert f"exact accuracy {exact / 8:.2%} ({exact}/8) | valid {valid / 8:.2%}" in summary, summary
    assert re.search(r'\d+ puzzles/s on cpu', summary)
    # without --json: only the summary (no grid per puzzle), the same numbers
    plain = good['csv'].stdout
    assert 'HRM answer' not in plain
    assert f"exact accuracy {exact / 8:.2%} ({exact}/8) | valid {valid / 8:.2%}" in plain
    assert re.search(r'\d+ puzzles/s on cpu', plain)
    # both numbers, never mixed: the paper's (1 view, every segment, no check) and the test-time one
    paper = next(line for line in plain.splitlines() if line.startswith('paper metric'))
    assert paper.startswith(f'paper metric (1 view, {HALT_MAX_STEPS} segments, no check): exact accuracy')
    assert next(line for line in plain.splitlines() if line.startswith('test-time (1 view, up to'))


def test_views_answers_check_and_are_digits(good, test_puzzles):
    # 4 symmetric views, 2 segments, no early stop: every answer is 81 digits, 'valid' and 'consistent'
    # agree with the independent checker, and a puzzle's answer came from a view that checks or the vote
    objects = [json.loads(line) for line in good['views'].stdout.splitlines()]
    assert [o['puzzle'] for o in objects] == [q for q, _, _ in test_puzzles]
    for o in objects:
        assert re.fullmatch('[1-9]{81}', o['solution'])
        valid, consistent = check(o['puzzle'], o['solution'])
        assert (o['valid'], o['consistent']) == (valid, consistent)
        assert o['steps'] == 2 and -1 <= o['view'] < 4
        if o['view'] >= 0 and o['view'] != 0:
            assert valid and consistent  # a view other than the first wins only by checking
    summary = good['views'].stderr
    assert 'paper metric (1 view, 2 segments, no check)' in summary
    assert 'test-time (4 views, up to 2 segments)' in summary
    assert ('test-time (2 views, up to 3 segments, checked, restarted every 1 keeping 2 hints): exact accuracy'
            in good['restart'].stdout)


def test_trace_shows_each_segment(good, test_puzzles):
    stdout = good['trace'].stdout
    segments = int(STATUS.search(stdout).group(3))
    lines = [line for line in stdout.splitlines() if line.startswith('segment ')]
    assert len(lines) == segments
    for t, line in enumerate(lines, start=1):
        assert re.match(rf'segment +{t}: [1-9.]{{81}} +\d+ cells changed', line), line
    assert '81 cells changed' in lines[0]
    assert lines[-1].split()[2] == answer_from_text(stdout)  # the last segment's grid is the answer shown
    # with views: each segment says how many views' answers check, and the status line where the answer came from
    stdout = good['views trace'].stdout
    lines = [line for line in stdout.splitlines() if line.startswith('segment ')]
    assert lines and all(re.search(r'\((\d)/3 views check\)', line) for line in lines)
    assert re.search(r'answer from view [123] of 3|no view checks: per-cell vote over 3 views', stdout)


def test_trace_over_batches_that_ran_different_numbers_of_segments(monkeypatch):
    # model.solve stops a batch once every row in it has halted, so two batches' traces can differ in length
    class Model:
        def solve(self, puzzles, segments=None, halt=False, views=1, check=False, trace=False, generator=None):
            B, T = len(puzzles), 1 + int(puzzles[0, 0])  # the first cell says how many segments the batch runs
            return Solution(grids=torch.ones(B, 81, dtype=torch.long), steps=torch.full((B,), T),
                            checked=torch.zeros(B, dtype=torch.bool), view=torch.zeros(B, dtype=torch.long),
                            q_halt=None, history=torch.ones(T, B, views, 81, dtype=torch.long) if trace else None)

    monkeypatch.setattr(sample, 'batch_size', 2)
    puzzles = torch.zeros(3, 81, dtype=torch.long)
    puzzles[2, 0] = 2  # batches [0, 1] and [2]: 1 and 3 segments
    result, seconds = sample.solve_all(Model(), puzzles, None, views=2, trace=True)
    assert result['steps'].tolist() == [1, 1, 3] and seconds > 0
    assert [tuple(h.shape) for h in result['history']] == [(1, 2, 81), (1, 2, 81), (3, 2, 81)]


# bad input ----------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def bad(checkpoint, test_puzzles, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('sample-bad')
    puzzle = test_puzzles[0][0]
    binary = tmp / 'binary.txt'
    binary.write_bytes(b'\xff\xfe\x00\x81 not text\n')
    # a copy of a row's given in a blank of the same row: a repeated digit
    blank, given = next((i, ch) for i in range(81) if puzzle[i] == '.'
                        for ch in puzzle[i // 9 * 9:i // 9 * 9 + 9] if ch != '.')
    conflicting = puzzle[:blank] + given + puzzle[blank + 1:]
    cases = {
        'wrong length': ([f'--puzzle={puzzle[:80]}'], None, '81 cells'),
        'illegal character': ([f'--puzzle=x{puzzle[1:]}'], None, "illegal character 'x'"),
        'conflicting givens': ([f'--puzzle={conflicting}'], None, 'conflict'),
        'missing checkpoint': ([f'--out_dir={tmp / "no-checkpoint"}'], None, 'no checkpoint at'),
        'missing file': ([f'--file={tmp / "no-such-file.txt"}'], None, 'no such file'),
        'binary file': ([f'--file={binary}'], None, 'cannot read'),
        'bad batch size': (['--batch_size=0'], None, 'batch_size'),
        'bad device': (['--device=nosuchdevice'], None, "device='nosuchdevice'"),
        'empty puzzle': (['--puzzle='], None, '81 cells'),
        'bad views': (['--views=0'], None, 'views'),
        'bad restart': (['--restart=-1'], None, 'restart'),
        'bad hints': (['--restart=1', '--hints=-1'], None, 'hints >= 0'),
        'hints without restart': (['--hints=2'], None, 'set --restart too'),
        'bad dtype': (['--dtype=float8'], None, 'dtype'),
    }
    results = run_all({name: (args, stdin) for name, (args, stdin, _) in cases.items()}, checkpoint)
    return {name: (results[name], cases[name][2]) for name in cases}


@pytest.mark.parametrize('case', ['wrong length', 'illegal character', 'conflicting givens', 'missing checkpoint',
                                  'missing file', 'binary file', 'bad batch size', 'bad device', 'empty puzzle',
                                  'bad views', 'bad restart', 'bad hints', 'hints without restart', 'bad dtype'])
def test_bad_input_is_one_error_line(bad, case):
    result, expected = bad[case]
    assert result.returncode == 2, result.stderr
    assert 'Traceback' not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert result.stdout == ''
