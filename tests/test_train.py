"""
End-to-end tests of train.py, run as subprocesses on a tiny generated dataset and a tiny model.
Each run takes a few seconds on a CPU; the runs are shared through module fixtures so the whole file
stays around two minutes on 2 cores. Both training modes are covered: the paper's (act='q' with the
Q-continue target and exploration) and the CPU config's (act='fixed' with the Sudoku attention mask).
"""

import csv
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import prepare_sudoku as sudoku
from model import HRM, HRMConfig

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / 'train.py')
TINY = ['--hidden_size=32', '--num_heads=2', '--H_layers=1', '--L_layers=1', '--H_cycles=1', '--L_cycles=2',
        '--halt_max_steps=3', '--global_batch_size=16', '--warmup_iters=5', '--lr=1e-3', '--puzzle_emb_lr=1e-3',
        '--log_interval=5', '--eval_max_puzzles=32', '--compile=False', '--device=cpu']
# The CPU config's training mode.
FIXED = TINY + ['--act=fixed', '--attn_mask=sudoku', '--q_target=False', '--loss=softmax']
# The paper's mode. lr_min_ratio=1.0 keeps the lr constant after warmup, so the schedule does not
# depend on max_iters and a run cut at N/2 then resumed to N sees the same lr at every step.
PAPER = TINY + ['--act=q', '--q_target=True', '--halt_exploration_prob=0.5', '--lr_min_ratio=1.0']
TTC = ['--eval_views=3', '--eval_check=True', '--eval_restart=2', '--eval_hints=2']
FIXED_STEPS, PAPER_STEPS = 20, 10  # PAPER_STEPS / 2 = 5 is not a multiple of halt_max_steps = 3: rows are mid-puzzle there


def run_env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    env.update(extra)
    return env


def train(*args, cwd=ROOT, env=None, timeout=300):
    return subprocess.run([sys.executable, TRAIN, *map(str, args)], cwd=cwd, env=env or run_env(),
                          capture_output=True, text=True, timeout=timeout)


def torchrun(*args, nproc=2, timeout=300):
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', TRAIN, *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=timeout)


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert 'Traceback' not in result.stderr, result.stderr
    return result


def load(out_dir):
    return torch.load(Path(out_dir) / 'ckpt.pt', map_location='cpu', weights_only=False)


def records(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / 'log.jsonl').read_text().splitlines()]


def assert_same(a, b, where='checkpoint'):
    """Bitwise equality of nested checkpoint contents."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f'{where}[{k!r}]')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f'{where}[{i}]')
    else:
        assert a == b, f'{where}: {a!r} != {b!r}'


def assert_close_params(a, b, rtol=1e-4, atol=1e-5):
    assert a['model'].keys() == b['model'].keys()
    for k in a['model']:
        assert torch.allclose(a['model'][k], b['model'][k], rtol=rtol, atol=atol), \
            f"{k}: max diff {(a['model'][k] - b['model'][k]).abs().max().item():.3g}"


# fixtures: the dataset, one run per mode ---------------------------------------------------------------

@pytest.fixture(scope='module')
def fixed_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('fixed')
    # with EMA weights: evals, eval_only and the checkpoint's 'ema' must all use them; with test-time
    # compute on, so the logged exact_acc can be compared with an eval_only run that has it off
    result = ok(train(*FIXED, f'--data_dir={data_dir}', f'--out_dir={out}', f'--max_iters={FIXED_STEPS}', '--ema=0.9',
                      *TTC))
    return out, result


@pytest.fixture(scope='module')
def paper_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('paper')
    result = ok(train(*PAPER, f'--data_dir={data_dir}', f'--out_dir={out}', f'--max_iters={PAPER_STEPS}'))
    return out, result


# 1. smoke ----------------------------------------------------------------------------------------------

def test_smoke_loss_falls_and_outputs_are_written(fixed_run, data_dir):
    out, result = fixed_run
    log = records(out)
    train_log = [r for r in log if not r.get('eval')]
    evals = [r for r in log if r.get('eval')]
    assert [r['step'] for r in train_log] == [5, 10, 15, 20]
    assert train_log[-1]['loss'] < 0.95 * train_log[0]['loss'], [r['loss'] for r in train_log]
    # act='fixed': every row finishes a puzzle every halt_max_steps = 3 steps, all rows together
    assert [r['puzzles_seen'] for r in train_log] == [(s // 3) * 16 for s in (5, 10, 15, 20)]
    assert all(r['train_steps'] == 3.0 for r in train_log)

    # the final eval (eval_interval is far away, so only the one at the end)
    assert len(evals) == 1
    ev = evals[0]
    assert ev['step'] == FIXED_STEPS and ev['puzzles_seen'] == (FIXED_STEPS // 3) * 16 and ev['puzzles'] == 32
    assert ev['wall_s'] > 0 and 0 <= ev['exact_acc'] <= 1 and 0 <= ev['cell_acc'] <= 1
    assert ev['steps'] == 3.0 and ev['q_halt_acc'] is None  # no Q head in this mode
    # per-bin counts, recomputed here from the first 32 test puzzles
    test = sudoku.read_split(data_dir, 'test')[:32]
    ratings = np.asarray(sudoku.read_ratings(data_dir, 'test')[:32]).astype(int)
    givens = (test[:, :81] > 0).sum(1)
    want_givens = {}
    for g in givens:
        name = next(name for lo, hi, name in [(17, 21, '17-21'), (22, 25, '22-25'), (26, 29, '26-29'), (30, 34, '30-34'),
                                              (35, 40, '35-40'), (41, 99, '41+')] if lo <= g <= hi)
        want_givens[name] = want_givens.get(name, 0) + 1
    want_ratings = {}
    for r in ratings:
        name = next(name for lo, hi, name in sudoku.RATING_BINS if lo <= r and (hi is None or r <= hi))
        want_ratings[name] = want_ratings.get(name, 0) + 1
    got_givens = {k.split('/')[1]: v[1] for k, v in ev.items() if k.startswith('exact_by_givens/')}
    got_ratings = {k.split('/')[1]: v[1] for k, v in ev.items() if k.startswith('exact_by_rating/')}
    assert got_givens == want_givens and got_ratings == want_ratings
    by_bin_right = sum(v[0] * v[1] for k, v in ev.items() if k.startswith('exact_by_givens/'))
    assert abs(by_bin_right - ev['exact_acc'] * 32) < 1e-6
    # the test-time metric beside it, with its own breakdown and settings
    assert 0 <= ev['exact_acc_ttc'] <= 1 and ev['ttc_views'] == 3 and ev['ttc_check'] and ev['ttc_segments'] == 3
    assert ev['ttc_restart'] == 2 and ev['ttc_hints'] == 2
    assert 1 <= ev['ttc_steps'] <= 3 and ev['ttc_puzzles_per_s'] > 0
    ttc_by_bin = sum(v[0] * v[1] for k, v in ev.items() if k.startswith('exact_ttc_by_rating/'))
    assert abs(ttc_by_bin - ev['exact_acc_ttc'] * 32) < 1e-6

    # eval_failures.csv: one row per wrong test answer, each row consistent with the test set
    with open(out / 'eval_failures.csv', newline='') as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['puzzle', 'prediction', 'solution', 'rating', 'givens', 'n_wrong', 'wrong_cells',
                       'ttc_prediction', 'ttc_n_wrong']
    # one row per puzzle that either metric got wrong
    assert len(rows) - 1 == len({r[0] for r in rows[1:]})
    assert round(32 * (1 - ev['exact_acc'])) == sum(r[1] != r[2] for r in rows[1:])
    assert round(32 * (1 - ev['exact_acc_ttc'])) == sum(r[7] != r[2] for r in rows[1:])
    known = {sudoku.grid_to_string(r[:81]): sudoku.grid_to_string(r[81:]) for r in test}
    for puzzle, prediction, solution, rating, n_givens, n_wrong, wrong_cells, ttc_prediction, ttc_n_wrong in rows[1:]:
        assert known[puzzle] == solution
        assert prediction != solution or ttc_prediction != solution
        assert all(ch in '123456789' for ch in prediction + ttc_prediction) and len(ttc_prediction) == 81
        wrong = [i for i in range(81) if prediction[i] != solution[i]]
        assert int(n_wrong) == len(wrong)
        assert wrong_cells.split() == [f'r{i // 9 + 1}c{i % 9 + 1}' for i in wrong]
        assert int(ttc_n_wrong) == sum(a != b for a, b in zip(ttc_prediction, solution))
        assert int(n_givens) == sum(ch != '.' for ch in puzzle)

    # the checkpoint loads into a fresh model of the saved architecture
    ckpt = load(out)
    assert ckpt['step'] == FIXED_STEPS and ckpt['config']['act'] == 'fixed' and ckpt['config']['attn_mask'] == 'sudoku'
    model = HRM(HRMConfig(**{k: ckpt['config'][k] for k in HRMConfig.__dataclass_fields__}))
    model.load_state_dict(ckpt['model'])
    assert json.loads((out / 'config.json').read_text())['max_iters'] == FIXED_STEPS
    assert 'eval at step 20' in result.stdout


# 2. resume equality -------------------------------------------------------------------------------------

def test_resume_is_bitwise_identical_to_a_straight_run(paper_run, data_dir, tmp_path):
    straight_dir, _ = paper_run
    ok(train(*PAPER, f'--data_dir={data_dir}', f'--out_dir={tmp_path}', f'--max_iters={PAPER_STEPS // 2}'))
    mid = load(tmp_path)
    assert mid['step'] == PAPER_STEPS // 2
    # the ACT carry crosses the boundary: rows are in the middle of their puzzle
    assert (~mid['carry'].halted).any() and (mid['carry'].steps > 0).any()
    resumed = ok(train(*PAPER, f'--data_dir={data_dir}', f'--out_dir={tmp_path}', f'--max_iters={PAPER_STEPS}', '--init_from=resume'))
    assert f'resumed from {tmp_path / "ckpt.pt"} at step {PAPER_STEPS // 2}' in resumed.stdout

    a, b = load(straight_dir), load(tmp_path)
    for key in ('model', 'optimizer', 'emb_optimizer', 'carry', 'step', 'puzzles_seen', 'order', 'cursor',
                'order_rng', 'device_rng', 'cpu_rng', 'best_exact'):
        assert_same(a[key], b[key], key)
    # and the logged training loss over steps 6..10 is the same number
    loss_a = [r['loss'] for r in records(straight_dir) if r['step'] == PAPER_STEPS and not r.get('eval')]
    loss_b = [r['loss'] for r in records(tmp_path) if r['step'] == PAPER_STEPS and not r.get('eval')]
    assert loss_a == loss_b and len(loss_a) == 1


def test_q_head_trains_in_paper_mode(paper_run):
    ckpt = load(paper_run[0])
    # initialised to weight 0, bias -5: training on "is the answer right" must move them
    assert not torch.all(ckpt['model']['q_head.bias'] == -5)


# 3. DDP and gradient accumulation --------------------------------------------------------------------------

def test_gradient_accumulation_matches_one_micro_batch(fixed_run, data_dir, tmp_path):
    ok(train(*FIXED, f'--data_dir={data_dir}', f'--out_dir={tmp_path}', f'--max_iters={FIXED_STEPS}', '--gradient_accumulation_steps=2'))
    a, b = load(fixed_run[0]), load(tmp_path)
    assert_close_params(a, b)
    for field in ('steps', 'halted', 'inputs', 'labels'):
        assert_same(getattr(a['carry'], field), getattr(b['carry'], field), field)


def test_ddp_with_accumulation_matches_one_process(fixed_run, data_dir, tmp_path):
    result = ok(torchrun(*FIXED, f'--data_dir={data_dir}', f'--out_dir={tmp_path}', f'--max_iters={FIXED_STEPS}',
                         '--gradient_accumulation_steps=2'))
    assert 'world 2 x accumulation 2 x micro-batch 4' in result.stdout
    assert result.stdout.count('eval at step') == 1  # printed by rank 0 only
    a, b = load(fixed_run[0]), load(tmp_path)
    assert_close_params(a, b)
    # the saved carry is gathered from both ranks back into global row order
    for field in ('steps', 'halted', 'inputs', 'labels'):
        assert_same(getattr(a['carry'], field), getattr(b['carry'], field), field)
    assert torch.allclose(a['carry'].z_H, b['carry'].z_H, rtol=1e-4, atol=1e-4)
    # the eval is sharded over the ranks and summed: the same puzzles counted once
    ev = [r for r in records(tmp_path) if r.get('eval')][0]
    assert ev['puzzles'] == 32 and sum(v[1] for k, v in ev.items() if k.startswith('exact_by_givens/')) == 32


def test_ddp_paper_mode_matches_one_process(paper_run, data_dir, tmp_path):
    # the exploration draw is made for the global batch and sliced per rank, so the runs agree
    ok(torchrun(*PAPER, f'--data_dir={data_dir}', f'--out_dir={tmp_path}', f'--max_iters={PAPER_STEPS}'))
    assert_close_params(load(paper_run[0]), load(tmp_path))


# 4. signals -------------------------------------------------------------------------------------------------

def test_curriculum_fills_puzzles_to_its_scheduled_givens(data_dir, tmp_path):
    # 6 steps of 3-segment puzzles: rows load puzzles at steps 0 and 3; curriculum_frac=1 makes the minimum
    # givens at step t round(81 - (81 - 17) * t / 6): 49 at step 3, above the data's 30-40
    ok(train(*FIXED, f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--max_iters=6', '--curriculum_givens=81',
             '--curriculum_frac=1.0'))
    assert [(r['step'], r['curriculum_min_givens']) for r in records(tmp_path) if not r.get('eval')] == \
        [(5, round(81 - 64 * 4 / 6)), (6, round(81 - 64 * 5 / 6))]
    carry = load(tmp_path)['carry']  # the puzzles the rows are on, as the model saw them
    puzzles, solutions = carry.inputs, carry.labels
    assert ((puzzles > 0).sum(1) == 49).all()
    for p, sol in zip(puzzles.tolist(), solutions.tolist()):
        assert all(sorted(sol[i] for i in unit) == list(range(1, 10)) for unit in sudoku.UNITS)
        assert all(c in (0, d) for c, d in zip(p, sol))


def test_paced_curriculum_steps_down_after_each_interval_at_pace(data_dir, tmp_path):
    # every cell given at first (a high lr learns to copy them within 30 steps); the minimum then falls by
    # one after each log interval whose train exact accuracy reaches 0.5, and stays put otherwise
    ok(train(*FIXED, f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--max_iters=30', '--lr=1e-2',
             '--curriculum_givens=81', '--curriculum_pace=0.5'))
    log = [r for r in records(tmp_path) if not r.get('eval')]
    expected = 81
    for r in log:
        assert r['curriculum_min_givens'] == expected
        expected -= r['train_exact_acc'] >= 0.5
    assert expected < 81 and load(tmp_path)['paced_givens'] == expected


def test_ema_follows_its_recursion_across_a_resume(data_dir, tmp_path):
    """EMA weights (ema > 0) are saved, resumed, and updated as ema <- ema + (1 - d) (param - ema) with the
    decay d = min(ema, (1 + t) / (10 + t)) at update t (0-based), checked from two checkpoints."""
    ok(train(*FIXED, f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--max_iters=6', '--ema=0.9'))
    before = load(tmp_path)
    ok(train(*FIXED, f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--max_iters=7', '--ema=0.9', '--init_from=resume'))
    after = load(tmp_path)
    decay = min(0.9, (1 + 6) / (10 + 6))
    names = [n for n in after['model'] if n not in ('H_init', 'L_init')]  # parameters, in model.parameters() order
    assert len(names) == len(after['ema'])
    for name, old, new in zip(names, before['ema'], after['ema']):
        expected = old.double() + (1 - decay) * (after['model'][name].double() - old.double())
        torch.testing.assert_close(new.double(), expected, rtol=1e-6, atol=1e-7, msg=name)
        assert not torch.equal(new, after['model'][name]), name  # a real average, not a copy


def start_and_signal(args, sig, timeout=120):
    """Start train.py, wait for its first 'step' log line, send `sig`, return (exit code, stdout, stderr, that line)."""
    proc = subprocess.Popen([sys.executable, TRAIN, *map(str, args)], cwd=ROOT, env=run_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, line = [], ''
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline()
                if not line:
                    break  # exited early
                seen.append(line)
                if line.startswith('step '):
                    proc.send_signal(sig)
                    break
        else:
            raise AssertionError(f"no 'step' line within {timeout}s:\n{''.join(seen)}")
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, ''.join(seen) + stdout, stderr, line


def test_sigterm_saves_and_resumes_then_sigint(data_dir, tmp_path):
    args = [*FIXED, f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--max_iters=100000', '--log_interval=2']
    code, stdout, stderr, line = start_and_signal(args, signal.SIGTERM)
    assert line.startswith('step '), stdout + stderr
    assert code == 0, stdout + stderr
    assert 'Traceback' not in stderr and 'stopped by signal at step' in stdout
    first = load(tmp_path)
    assert first['step'] > 0 and first['step'] % 2 == 0  # stops at a log step, with no eval on the way out
    assert not any(r.get('eval') for r in records(tmp_path))

    code, stdout, stderr, line = start_and_signal([*args, '--init_from=resume'], signal.SIGINT)
    assert code == 0, stdout + stderr
    assert f"resumed from {tmp_path / 'ckpt.pt'} at step {first['step']}" in stdout
    assert int(line.split()[1].split('/')[0]) == first['step'] + 2  # the first log line after the resume
    second = load(tmp_path)
    assert second['step'] > first['step'] and second['puzzles_seen'] > first['puzzles_seen']


def test_max_minutes_stops_at_a_log_step_with_a_final_eval(data_dir, tmp_path):
    ok(result := train(*FIXED, f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--max_iters=100000',
                       '--log_interval=2', '--max_minutes=0.0001'))
    assert 'stopping: max_minutes=0.0001 reached' in result.stdout
    log, step = records(tmp_path), load(tmp_path)['step']
    assert step % 2 == 0 and step < 100 and log[-1].get('eval') and log[-1]['step'] == step
    assert load(tmp_path)['eval_s'] > 0  # a resume counts the final eval's length against max_minutes too


# 5. config errors ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def error_runs(data_dir, tmp_path_factory):
    """Every bad invocation at once (each is mostly Python and torch start-up)."""
    tmp = tmp_path_factory.mktemp('errors')
    good = [f'--data_dir={data_dir}', f'--out_dir={tmp / "out"}', '--max_iters=1', *TINY]
    cases = {
        'unknown key': ([*good, '--bogus=1'], "unknown config key 'bogus'"),
        'type mismatch float': ([*good, '--lr=abc'], "lr='abc'"),
        'type mismatch bool': ([*good, '--compile=3'], 'compile=3'),
        'None for a float': ([*good, '--lr=None'], 'lr=None'),
        'missing config file': (['config/no_such_config.py', *good], 'no_such_config.py'),
        'missing data dir': ([*good, f'--data_dir={tmp / "no-data"}'], 'python prepare_sudoku.py'),
        'bad init_from': ([*good, '--init_from=pretrained'], "init_from='pretrained'"),
        'resume without checkpoint': ([*good, '--init_from=resume', f'--out_dir={tmp / "empty"}'], 'no checkpoint at'),
        'bad device': ([*good, '--device=nosuchdevice'], "device='nosuchdevice'"),
        'float16': ([*good, '--dtype=float16'], "dtype='float16' needs loss scaling"),
        'bad eval_views': ([*good, '--eval_views=0'], 'eval_views=0 must be >= 1'),
        'bad eval_restart': ([*good, '--eval_restart=-1'], 'eval_restart=-1 and eval_hints=0 >= 0'),
        'bad eval_hints': ([*good, '--eval_restart=2', '--eval_hints=-1'], 'eval_hints=-1 >= 0'),
        'eval_hints without restart': ([*good, '--eval_hints=2'], 'set eval_restart too'),
        'bad curriculum': ([*good, '--curriculum_givens=90'], 'curriculum_givens=90'),
    }
    procs = {name: subprocess.Popen([sys.executable, TRAIN, *args], cwd=ROOT, env=run_env(), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name, (args, _) in cases.items()}
    results = {name: (proc.communicate(timeout=300), proc.returncode) for name, proc in procs.items()}
    return {name: (results[name], cases[name][1]) for name in cases}


@pytest.mark.parametrize('case', ['unknown key', 'type mismatch float', 'type mismatch bool', 'None for a float',
                                  'missing config file', 'missing data dir', 'bad init_from', 'resume without checkpoint',
                                  'bad device', 'float16', 'bad eval_views', 'bad eval_restart', 'bad eval_hints',
                                  'eval_hints without restart', 'bad curriculum'])
def test_config_errors_are_one_line(error_runs, case):
    ((stdout, stderr), code), expected = error_runs[case]
    assert code != 0
    assert 'Traceback' not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1, stderr
    assert expected in errors[0], errors[0]
    assert 'step ' not in stdout  # nothing trained


def test_configurator_parses_and_checks_types():
    """In-process: the parsing rules behind the one-line errors above."""
    from configurator import ConfigError, configure
    config = {'lr': 1e-4, 'max_iters': 0, 'compile': True, 'device': 'auto', 'wandb_run_name': 'x'}
    assert configure(config, ['--lr=1', '--max_iters=7', '--compile=False', '--device=cuda:1', '--wandb_run_name=2024']) == \
        ['lr', 'max_iters', 'compile', 'device', 'wandb_run_name']
    assert config == {'lr': 1.0, 'max_iters': 7, 'compile': False, 'device': 'cuda:1', 'wandb_run_name': '2024'}
    assert isinstance(config['lr'], float)  # an int literal for a float key becomes a float
    for bad in (['--lr'], ['--max_iters=1.5'], ['--max_iters=True'], ['--compile=1'], ['--compile=None'], ['--nope=1']):
        with pytest.raises(ConfigError):
            configure(dict(config), bad)


# 6. eval_only ---------------------------------------------------------------------------------------------------

def test_eval_only_prints_the_breakdown(fixed_run, data_dir, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(fixed_run[0], out)
    result = ok(train(*FIXED, f'--data_dir={data_dir}', f'--out_dir={out}', '--eval_only=True'))
    lines = result.stdout.splitlines()
    summary = next(line for line in lines if line.startswith('exact accuracy'))
    assert any(line.strip().startswith('by rating:') for line in lines)
    assert any(line.strip().startswith('by givens:') for line in lines)
    # the same checkpoint on the same 32 puzzles: the numbers the training run logged at its final eval
    ev = [r for r in records(fixed_run[0]) if r.get('eval')][-1]
    assert f"exact accuracy {ev['exact_acc']:.2%} | cell accuracy {ev['cell_acc']:.2%}" in summary
    assert '| 32 puzzles' in summary
    assert 'step ' not in result.stdout  # no training
    assert (out / 'eval_failures.csv').exists()
    assert 'test-time' not in result.stdout  # off unless asked for
    # with test-time compute on, the paper's number is the same and the test-time one comes beside it
    result = ok(train(*FIXED, f'--data_dir={data_dir}', f'--out_dir={out}', '--eval_only=True', *TTC))
    lines = result.stdout.splitlines()
    assert f"exact accuracy {ev['exact_acc']:.2%} | cell accuracy {ev['cell_acc']:.2%}" in lines[1]
    assert (f"  test-time: exact accuracy {ev['exact_acc_ttc']:.2%} with 3 views, up to 3 segments, checked, "
            f"restarted every 2 keeping 2 hints |") in lines[2]
    assert any(line.startswith('  test-time by rating:') for line in lines)


# 7. non-finite loss -----------------------------------------------------------------------------------------------

def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(fixed_run, data_dir, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(fixed_run[0], out)
    before = (out / 'ckpt.pt').read_bytes()
    log_before = (out / 'log.jsonl').read_text()
    # lr = 1e30 in float32: the first updates put the weights near 1e30, the forward overflows, and the loss
    # becomes NaN within the first log interval
    result = train(*FIXED, f'--data_dir={data_dir}', f'--out_dir={out}', '--init_from=resume',
                   f'--max_iters={FIXED_STEPS + 10}', '--lr=1e30', '--warmup_iters=0', '--dtype=float32')
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'loss is' in errors[0] and ('nan' in errors[0] or 'inf' in errors[0]), result.stderr
    assert (out / 'ckpt.pt').read_bytes() == before
    assert (out / 'log.jsonl').read_text() == log_before  # the bad window is not logged
    assert load(out)['step'] == FIXED_STEPS


# 8. wandb (offline), from another working directory ----------------------------------------------------------------

def test_wandb_offline_from_another_directory(tmp_path):
    data = tmp_path / 'data'  # missing: train.py generates it with prepare_args, from its own directory
    env = run_env(WANDB_MODE='offline', WANDB_CONFIG_DIR=str(tmp_path / 'wandb-config'),
                  WANDB_CACHE_DIR=str(tmp_path / 'wandb-cache'), WANDB_DATA_DIR=str(tmp_path / 'wandb-data'))
    result = ok(train(*FIXED, f'--data_dir={data}', f'--out_dir={tmp_path / "out"}', '--max_iters=5', '--wandb_log=True',
                      '--prepare_args=--source=generate --n_train=32 --n_test=16 --min_givens=30 --max_givens=40 '
                      '--subsample_size=0 --workers=1', '--eval_max_puzzles=16', cwd=tmp_path, env=env))
    assert 'data missing, generating it' in result.stdout and (data / 'train.bin').exists()
    runs = list((tmp_path / 'wandb').glob('offline-run-*'))
    assert len(runs) == 1
    logged = b''.join(p.read_bytes() for p in runs[0].glob('run-*.wandb'))
    assert b'train_cell_acc' in logged and b'exact_acc' in logged  # the training and eval records reached wandb
    assert (tmp_path / 'out' / 'ckpt.pt').exists()
