# The paper's Sudoku-Extreme recipe on one GPU (the reference's single-GPU settings):
#   python prepare_sudoku.py            # 1000 train puzzles from sapientinc/sudoku-extreme
#   python train.py config/sudoku_1gpu.py
out_dir = 'out-sudoku-1gpu'
data_dir = 'data/sudoku-extreme-1k'
global_batch_size = 384
lr = 7e-5
puzzle_emb_lr = 7e-5
weight_decay = 1.0
puzzle_emb_weight_decay = 1.0
epochs = 20000
eval_interval = 2000.0
eval_max_puzzles = 10000  # the full test split is 423k puzzles: use eval_only=True for the final number
