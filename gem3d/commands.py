"""The command type behind `gem3d <stage>`: each stage module declares its commands with it (gem3d/cli.py
collects them: `all_commands`).

A `Command` wraps one typed stage function `func(cfg, **options)`; `Arg`s become extra
command-line options whose `dest` names are the keyword arguments of `func`. A command with
`needs_config=False` (`gem3d score`) takes no `--config` and is called as `func(**options)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Arg:
    flags: tuple[str, ...]  # e.g. ("--stage",)
    options: dict[str, Any] = field(default_factory=dict)  # argparse keywords; `dest` = func's keyword


@dataclass(frozen=True)
class Command:
    func: Callable[..., None]
    help: str
    args: tuple[Arg, ...] = ()
    data_parallel: bool = False  # accepts --nproc N (re-run under torchrun with N processes)
    needs_data_path: bool = False  # the config's data.path must exist (only `import` reads it; planning and
    # every later stage run without the input data)
    needs_config: bool = True  # False: no --config option; func(**options) (a tool on files of the user's own)
    accepts_bundle: bool = False  # --bundle DIR instead of --config: the config and networks of `gem3d export`
