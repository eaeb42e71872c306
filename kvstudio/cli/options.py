"""What several commands read from their arguments: the policy's parameters, the policy, the prompt.

`run`, `cache save` and `finetune` declare the same policy options and read them the same way, so
a parameter means one thing in every command. Imports of kvstudio.core that pull in torch stay
inside the functions: `kvstudio --help` and a usage error must not wait for torch to import.
"""

from __future__ import annotations

import argparse
import sys


def add_policy_options(parser: argparse.ArgumentParser) -> None:
    """One option per parameter any policy declares; a name means the same thing in every policy."""
    from kvstudio.core.policies import available_policies

    group = parser.add_argument_group("policy parameters (each applies to the policies that declare it)")
    seen = {}
    for policy in available_policies().values():
        for spec in policy.Config.parameters():
            users = seen.setdefault(spec.name, [spec, []])[1]
            users.append(policy.name)
    for name, (spec, users) in seen.items():
        help_text = f"{spec.help} [{', '.join(users)}]"
        try:
            if spec.type is bool:
                group.add_argument(spec.option, dest=f"policy_{name}", action="store_true", default=None,
                                   help=help_text)
            else:
                group.add_argument(spec.option, dest=f"policy_{name}", type=spec.type, default=None,
                                   metavar=spec.type.__name__.upper().replace("STR", "TEXT"),
                                   choices=spec.choices, help=help_text)
        except argparse.ArgumentError:  # a plugin parameter named like a run option (--model, --seed)
            print(f"kvstudio: warning: parameter {spec.option} of {', '.join(users)} clashes with a "
                  "`kvstudio run` option and cannot be set from the command line", file=sys.stderr)


def policy_from_args(args):
    from kvstudio.core.errors import PolicyConfigError
    from kvstudio.core.policies import policy_class

    cls = policy_class(args.policy)
    accepted = {spec.name for spec in cls.Config.parameters()}
    given = {k.removeprefix("policy_"): v for k, v in vars(args).items() if k.startswith("policy_") and v is not None}
    foreign = sorted(set(given) - accepted)
    if foreign:
        options = ", ".join("--" + name.replace("_", "-") for name in foreign)
        known = ", ".join("--" + name.replace("_", "-") for name in sorted(accepted))
        raise PolicyConfigError(f"{options} does not apply to policy '{cls.name}' (its options: {known})")
    from kvstudio.core.spec import CacheSpec

    return CacheSpec(cls.name, given).build()


def prompt_from_args(args) -> str:
    from kvstudio.core.io.documents import read_document
    from kvstudio.core.errors import PromptError

    if args.prompt_file:  # the studio's reader: a PDF by its suffix, any other name as text
        path = args.prompt_file[0] if isinstance(args.prompt_file, list) else args.prompt_file  # run's repeats
        return read_document(path, what="prompt file", any_suffix=True).text
    if args.prompt is None:
        raise PromptError("no prompt: give --prompt TEXT or --prompt-file PATH")
    if not args.prompt.strip():
        raise PromptError("--prompt is empty")
    return args.prompt
