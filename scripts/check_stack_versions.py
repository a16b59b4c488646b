"""Build-time gate: fail the image build unless the installed vLLM stack is
one this project supports (the pins live in vllm_ascend_ext/version_check.py,
the gate in vllm_ascend_ext/tools/image_gate.py).

    python scripts/check_stack_versions.py --platform ascend   # a row of ASCEND_LINES, and
                                                               # no vllm-ascend FlashComm2
    python scripts/check_stack_versions.py --platform cpu      # vllm in the supported range

Runs before this package is installed (the repository root is put on
sys.path), reads distribution metadata only, and exits 1 with one line per
mismatch: package, version found, version expected.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_ascend_ext.builtin_flashcomm2 import (  # noqa: E402
    ConflictingFlashComm2,
    check_no_builtin_flashcomm2,
)
from vllm_ascend_ext.tools.image_gate import (  # noqa: E402
    STACK_PACKAGES,
    UnsupportedStack,
    check_stack,
    installed_versions,
    matching_line,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--platform", choices=sorted(STACK_PACKAGES), default="ascend")
    args = ap.parse_args(argv)
    found = installed_versions()
    try:
        if args.platform == "ascend":
            check_no_builtin_flashcomm2()
        check_stack(found, platform=args.platform)
    except (UnsupportedStack, ConflictingFlashComm2) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    shown = ", ".join(f"{k} {v}" for k, v in found.items() if v is not None)
    line = matching_line(found) if args.platform == "ascend" else None
    print(f"supported {args.platform} stack: {shown}" + (f" (vllm-ascend line {line.name})"
                                                         if line else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
