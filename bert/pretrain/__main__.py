"""``python -m bert.pretrain`` / ``deepspeed --module bert.pretrain``: the per-rank entry point."""

import sys

from bert.pretrain.rank import cli

sys.exit(cli())
