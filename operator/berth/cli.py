"""The `berth` command: one entry point, each subcommand owned by its module.

Subcommands import lazily so that `berth crd` or `berth operator` never pull in torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# subcommand -> (module, function, help); each function takes the remaining argv.
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "operator": ("berth.controller.main", "main", "run the ModelDeployment operator (kopf)"),
    "serve": ("berth.server.main", "main", "run the inference server (default: built-in SmolLM2)"),
    "gateway": ("berth.gateway.main", "main", "run the gateway: one OpenAI endpoint for every instance"),
    "crd": ("berth.api.crd", "main", "print the ModelDeployment CustomResourceDefinition"),
    "bench": ("berth.bench", "main", "load-test an OpenAI-compatible endpoint"),
}


def _usage() -> str:
    lines = ["usage: berth <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()]
    lines.append("")
    lines.append("`berth <command> --help` shows a command's options.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        from berth import __version__

        print(f"berth {__version__}")
        return 0
    name = args[0]
    if name not in SUBCOMMANDS:
        print(f"berth: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = SUBCOMMANDS[name]
    func: Callable[[list[str]], int | None] = getattr(importlib.import_module(module_name), func_name)
    return int(func(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
