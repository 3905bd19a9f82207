# bench.py end to end in quick mode: every section at toy sizes, so a stale call into model.py, sample.py or
# train.py's config block fails here instead of on the first GPU run.
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# one thread (the suite may share the machine); no TRITON_INTERPRET (conftest.py sets it for the kernel tests):
# bench.py times Triton only on a GPU, and there it should be the real thing
ENV = {**{k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}, 'OMP_NUM_THREADS': '1'}


def numbers(record):
    """Every number in a JSON record, nested or not (bools are not numbers here)."""
    if isinstance(record, dict):
        return [x for v in record.values() for x in numbers(v)]
    if isinstance(record, list):
        return [x for v in record for x in numbers(v)]
    return [record] if isinstance(record, (int, float)) and not isinstance(record, bool) else []


def test_quick_run_covers_every_section(tmp_path):
    out = tmp_path / 'bench.json'
    result = subprocess.run([sys.executable, 'bench.py', '--quick=True', f'--json={out}'], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record['failures'] == []
    for section in ('attention', 'optimizer', 'train', 'memory', 'inference'):
        assert section in record, f"no {section} section"
        assert record[section]['section_s'] > 0
        assert len(numbers(record[section])) > 5, f"{section}: no numbers in {record[section]}"

    def timed(rows):  # every row ran, none failed, with a positive median
        assert rows and all('failed' not in r and r['median_ms'] > 0 for r in rows), rows
    for row in record['attention']['results']:
        timed([row['forward'], row['forward_backward']])
    timed(record['optimizer']['results'])
    timed(record['train']['results'])
    assert {r['config'] for r in record['train']['results']} == {'paper', 'cpu'}
    timed(record['memory']['results'])
    timed(record['inference']['batch'])
    rows = record['inference']['batch']
    assert {(r['config'], r['views']) for r in rows} == {(c, v) for c in ('paper', 'cpu') for v in (1, 8)}
    single = record['inference']['single_puzzle']  # load_checkpoint, then solve as sample.py does
    timed([single['load'], single['solve']])
    assert all(r['peak_memory_bytes'] > 0 for r in record['train']['results'] + record['memory']['results'])


def test_bad_section_fails_in_one_line():
    result = subprocess.run([sys.executable, 'bench.py', '--sections=nope'], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env=ENV)
    assert result.returncode == 2 and result.stderr.startswith('error: sections=')


def test_out_of_memory_rows_are_reported_and_the_run_goes_on(tmp_path):
    # a batch whose first tensor (the ACT carry, ~2 TB) the allocator refuses at once, without touching memory
    if Path('/proc/sys/vm/overcommit_memory').read_text().strip() == '1':
        return  # this kernel would hand it out and the OOM killer would act instead
    out = tmp_path / 'bench.json'
    result = subprocess.run([sys.executable, 'bench.py', '--quick=True', '--sections=train,memory',
                             '--train_configs=paper', '--paper_batch=200000000', '--cpu_batch=200000000',
                             '--accum_splits=1,2', f'--json={out}'],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads(out.read_text())
    rows = record['train']['results'] + record['memory']['results']
    assert len(rows) == 3 and all(r['failed'] == 'OOM' for r in rows), rows
    assert 'OOM' in result.stdout
