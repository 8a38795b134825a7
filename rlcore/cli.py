"""The ``rlcore`` command: ``rlcore train [--config FILE] [--FIELD VALUE ...]`` RL-trains a causal LM.

Every ``TrainConfig`` field is a flag (``--algo gspo``, ``--steps 100``, ``--quick``), and flags override the
file. Exit status: 0 done, 2 a bad config (nothing was trained), 1 a run that stopped on an error it explains.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import List, Optional

__all__ = ["main"]

_DESCRIPTION = "rlcore: log-probabilities and RL losses for LLM post-training. Commands:"
_TRAIN = ("RL-train a causal LM (by default the embedded demo task on a tiny random Llama). Every TrainConfig "
          "field is a flag; flags override --config (a .json or .yaml file of fields). Exit status: 0 done, 2 a bad "
          "config, 1 a run that stopped on an error it explains.")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parser() -> argparse.ArgumentParser:
    from .trainer.config import _DEFAULTS, TrainConfig

    parser = argparse.ArgumentParser(prog="rlcore", description=_DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser("train", help="RL-train a causal LM (the embedded demo task by default)",
                           description=_TRAIN)
    train.add_argument("--config", metavar="FILE", help="a JSON or YAML file of TrainConfig fields")
    from .trainer.tasks import TASKS

    metavars = dict(out="DIR", model="PATH", teacher="PATH", reward="MODULE:FUNCTION")
    for name, (text, kind) in TrainConfig.fields_help().items():
        default = _DEFAULTS[name]
        if name == "task":                           # a registry (rlcore.trainer.TASKS), so its current keys
            kind = dataclasses.replace(kind, choices=tuple(TASKS))
        if kind.py is bool:
            train.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{text} (default: {'on' if default else 'off'})")
            continue
        shown = "null: " + kind.none if default is None else repr(default) if kind.py is str else default
        if kind.choices:
            train.add_argument(_flag(name), dest=name, default=None, choices=kind.choices,
                               help=f"{text}; one of %(choices)s (default: {shown})")
        else:
            # a string, parsed by TrainConfig, so the file and the flag share one parser and one message
            train.add_argument(_flag(name), dest=name, default=None,
                               metavar=metavars.get(name, kind.py.__name__.upper()),
                               help=f"{text}; {kind.accepted()} (default: {shown})")
    return parser


def _bad_config(e, given) -> int:
    """Exit status 2, one line naming the field as the user wrote it (``--lr`` for a flag, ``lr`` in the file)."""
    label = _flag(e.field) if e.field in given else e.field
    print(f"rlcore train: bad config: {e.render(label)}", file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from .trainer import ConfigError, RunError, load_config, train

    values = vars(args)
    values.pop("command")
    path = values.pop("config")
    given = {k for k, v in values.items() if v is not None}
    try:
        cfg = load_config(path, **values)
    except ConfigError as e:
        return _bad_config(e, given)
    except ValueError as e:
        print(f"rlcore train: bad config: {e}", file=sys.stderr)
        return 2
    try:
        train(cfg)
    except ConfigError as e:     # a setting only the built run can check (a teacher over another vocabulary)
        return _bad_config(e, given)
    except RunError as e:
        print(f"rlcore train: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
