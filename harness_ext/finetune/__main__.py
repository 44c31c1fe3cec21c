"""``python -m harness_ext.finetune`` and ``accelerate launch ... -m harness_ext.finetune``: ``needles finetune``.

The same generated flags as ``needles finetune`` (``--config run.yaml`` plus any option), run in
every process that accelerate starts.
"""

from __future__ import annotations

import sys

from harness_ext.core.errors import NeedlesError, debug, print_error
from harness_ext.finetune.args import finetune_parser, run_finetune


def main(argv: list[str] | None = None) -> int:
    """Parse the finetune flags and run; a NeedlesError prints as ``needles: error: ...`` and exits 2."""
    parser = finetune_parser(
        prog="python -m harness_ext.finetune",
        description="Finetune on synthetic KV-retrieval data (the flags of `needles finetune`).",
    )
    args = parser.parse_args(argv)
    try:
        return run_finetune(args)
    except NeedlesError as exc:
        if debug():
            raise
        print_error(exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
