"""``python -m bert.pretrain`` / ``deepspeed --module bert.pretrain``: the per-rank entry point."""

import os
import sys

# The packed batches change size every step (their real tokens), which fragments CUDA's caching allocator:
# on an H200 BERT-large at 128 tokens held 50 GiB for 31 GiB of tensors (2026-12-04). Expandable segments grow
# one mapping instead of caching blocks of every size. Set before the first CUDA allocation reads it; a value
# the user set stays.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from bert.pretrain.rank import cli  # noqa: E402

sys.exit(cli())
