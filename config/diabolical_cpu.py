# The CPU recipe on harder, human-rated puzzles: Sudoku Exchange's "diabolical" bucket (22-37 givens,
# shipped in ../shared/data/diabolical in the Sudoku-Extreme CSV format; see its SOURCES.md).
#   python train.py config/sudoku_cpu.py config/diabolical_cpu.py
# Later files override earlier ones: this keeps the model and schedule of sudoku_cpu.py.
out_dir = 'out-diabolical-cpu'
data_dir = 'data/diabolical'
prepare_args = '--source=../shared/data/diabolical --subsample_size=0'
