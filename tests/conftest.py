# Tests run on CPU: the Triton kernels run in the interpreter, which must be switched on before
# triton is first imported by any test module.
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
    """A tiny generated dataset (256 train, 64 test puzzles), made once per test session."""
    root = Path(__file__).resolve().parents[1]
    path = tmp_path_factory.getbasetemp() / 'sudoku-tiny'
    result = subprocess.run([sys.executable, 'prepare_sudoku.py', '--source=generate', '--n_train=256', '--n_test=64',
                             '--min_givens=30', '--max_givens=40', '--subsample_size=0', '--workers=1', f'--out_dir={path}'],
                            cwd=root, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return path
