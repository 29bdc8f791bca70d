"""``hedgehog``: one entry point, thin subcommands over typed library functions.

Each subcommand lives in its own module as ``main(argv: list[str]) -> int`` that parses its own
arguments (so ``hedgehog <cmd> --help`` is that module's help); this file only routes.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help). Modules are imported lazily so `hedgehog --help` is instant.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("hedgehog_attention.demo", "train a Hedgehog map to mimic softmax on random q/k (no downloads)"),
    "linearize": ("hedgehog_attention.convert.cli", "convert a pretrained HF model to linear attention"),
    "recall": ("hedgehog_attention.experiments.recall", "associative recall (App. B, Table 4, Fig. 5)"),
    "lm": ("hedgehog_attention.experiments.lm", "from-scratch language modelling (Table 1 analog)"),
    "finetuned-conversion": (
        "hedgehog_attention.experiments.finetuned_conversion",
        "finetuned MiniLM conversion (Tables 2 and 5 analog)",
    ),
    "pretrained-conversion": (
        "hedgehog_attention.experiments.pretrained_conversion",
        "SmolLM2 pretrained conversion (Table 3 analog)",
    ),
    "attention-maps": ("hedgehog_attention.experiments.attention_maps", "attention heat maps (Fig. 2, 4, 8)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: hedgehog <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`hedgehog <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"hedgehog: unknown command {name!r}; valid commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
