# Tests run on CPU: the Triton kernels run in the interpreter, which must be switched on before
# triton is first imported by any test module.
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
