# The paper's Sudoku-Extreme recipe on 8 GPUs (these are train.py's defaults, spelled out):
#   python prepare_sudoku.py
#   torchrun --standalone --nproc_per_node=8 train.py config/sudoku_8gpu.py
out_dir = 'out-sudoku-8gpu'
data_dir = 'data/sudoku-extreme-1k'
global_batch_size = 768
lr = 1e-4
puzzle_emb_lr = 1e-4
weight_decay = 1.0
puzzle_emb_weight_decay = 1.0
epochs = 20000
eval_interval = 2000.0
eval_max_puzzles = 10000
