"""``python -m bert.pretrain`` / ``deepspeed --module bert.pretrain``: the per-rank entry point."""

import atexit
import os
import sys

# The packed batches change size every step (their real tokens), which fragments CUDA's caching allocator:
# on an H200 BERT-large at 128 tokens held 50 GiB for 31 GiB of tensors (2026-12-04). Expandable segments grow
# one mapping instead of caching blocks of every size. Set before the first CUDA allocation reads it; a value
# the user set stays.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from bert.pretrain.rank import cli  # noqa: E402

code = cli()  # the process group is destroyed, every file of the run written and closed
# Interpreter teardown can still abort a finished rank ("terminate called without an active exception": gloo's
# threads meeting tensors freed while the interpreter is torn down), which the launcher reports as a failed
# run. So the exit handlers run here, then the process ends without that teardown.
atexit._run_exitfuncs()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
