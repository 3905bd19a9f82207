# The embedded default: learns to solve real (unique-solution) Sudoku on 2 CPU cores in minutes, on
# puzzles it generates itself the first time (no network, no GPU):
#   python train.py config/sudoku_cpu.py
# Not the paper's recipe: a small HRM with Sudoku-structured attention, fixed supervised segments
# and no Q head (see README, "Learning fast").
out_dir = 'out-sudoku-cpu'
data_dir = 'data/sudoku-gen-30-40'
prepare_args = '--source=generate --n_train=20000 --n_test=1000 --min_givens=30 --max_givens=40 --workers=2 --subsample_size=0'
# model
hidden_size = 64
num_heads = 2
expansion = 4.0
H_layers = 1
L_layers = 1
H_cycles = 2
L_cycles = 2
attn_mask = 'sudoku'
act = 'fixed'
halt_max_steps = 6
q_target = False
loss = 'softmax'
# training
global_batch_size = 32
lr = 2e-3
puzzle_emb_lr = 2e-3
weight_decay = 0.1
puzzle_emb_weight_decay = 0.1
beta2 = 0.999
warmup_iters = 50
lr_min_ratio = 0.05
max_iters = 12000
max_minutes = 27.0
eval_interval = 2.5
eval_max_puzzles = 1000
eval_segments = 16
log_interval = 50
target_exact_acc = 0.99
ema = 0.999
compile = False
