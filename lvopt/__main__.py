"""The ``lvopt`` command line (also ``python -m lvopt``): ``bench`` and ``transfer``."""

from __future__ import annotations

import sys

COMMANDS = {
    "bench": ("lvopt.bench", "benchmark lvopt against torch.optim, SparseAdam and DeepSpeed"),
    "transfer": ("lvopt.transfer", "optimal-LR fits and hyperparameter-transfer metrics over a sweep CSV"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: lvopt {" + ",".join(COMMANDS) + "} [options]\n")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:10s} {doc}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = __import__(COMMANDS[argv[0]][0], fromlist=["main"])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
