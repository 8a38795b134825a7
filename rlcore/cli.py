"""``rlcore`` on the command line. ``rlcore train [--config FILE] [--<field> VALUE ...]``: every
``TrainConfig`` field is a flag (``--algo gspo``, ``--steps 100``, ``--quick``); flags override the file."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import List, Optional

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from .trainer.config import TrainConfig

    parser = argparse.ArgumentParser(prog="rlcore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="RL-train a causal LM (the embedded demo task by default)",
                           description="RL-train a causal LM. Flags override --config (a .json or .yaml file).")
    train.add_argument("--config", help="a JSON or YAML file of TrainConfig fields")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        base = [a for a in typing.get_args(kind) if a is not type(None)]
        kind = base[0] if base else kind
        if kind is bool:
            train.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"(default: {f.default})")
        else:
            train.add_argument(flag, dest=f.name, type=kind, default=None, help=f"(default: {f.default})")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from .trainer import load_config, train

    values = vars(args)
    values.pop("command")
    path = values.pop("config")
    try:
        cfg = load_config(path, **values)
    except ValueError as e:
        print(f"rlcore train: bad config: {e}", file=sys.stderr)
        return 2
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
