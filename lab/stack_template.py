"""Expand a template's AWS::LanguageExtensions transform (Fn::ForEach) as CloudFormation does.

    .venv/bin/python lab/stack_template.py stack.yaml [Parameter=value ...] > expanded.json

CloudFormation expands the transform itself before it creates anything. Three of the project's
tools do not: moto (lab/emulator.py expands the template before moto reads it), checkov (the
Makefile scans the expansion) and the derivation of the stack's IAM permissions
(tests/support/aws_calls.py). All three use this module, so they see the same resources.

The expansion is cfn-lint's own (cfnlint.template.transforms._language_extensions). The module
is private: cfn-lint is pinned in requirements-dev.txt, and tests/aws/test_stack_template.py
pins what the expansion yields for stack.yaml. It resolves a reference to a parameter to that
parameter's Default, so the stack's parameter values are written in as Defaults first. Where it
cannot resolve a collection it makes up random names; expand() refuses that instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TRANSFORM = "AWS::LanguageExtensions"
FOR_EACH = "Fn::ForEach::"


def declares_the_transform(template: Mapping[str, Any]) -> bool:
    declared = template.get("Transform", [])
    return TRANSFORM in (declared if isinstance(declared, list) else [declared])


def decode(text: str) -> dict[str, Any]:
    """A template from its YAML (short-form tags such as !Ref included) or JSON text."""
    from cfnlint.decode import decode_str  # noqa: PLC0415 - cfn-lint takes a second to import

    template, errors = decode_str(text)
    if errors:
        raise ValueError(f"template does not parse: {errors[0].message}")
    return template


def load(path: Path | str) -> dict[str, Any]:
    return decode(Path(path).read_text())


def _plain(value: Any) -> Any:
    """cfn-lint's nodes (str_node, dict_node with line marks) as plain JSON data."""
    return json.loads(json.dumps(value))


def _unresolvable_collections(template: Mapping[str, Any], parameters: Mapping[str, Any]) -> list:
    """Loops over a parameter that has no value: the expander would make up names for them."""
    problems = []
    for section in ("Conditions", "Resources", "Outputs"):
        for key, loop in template.get(section, {}).items():
            if not key.startswith(FOR_EACH) or not isinstance(loop, list) or len(loop) != 3:
                continue
            collection = loop[1]
            if isinstance(collection, dict) and set(collection) == {"Ref"}:
                name = collection["Ref"]
                declared = template.get("Parameters", {}).get(name, {})
                value = parameters.get(name, declared.get("Default"))
                if not str(value or "").strip():
                    problems.append(f"{section}/{key} loops over parameter {name}, which is empty")
    return problems


def expand(
    template: Mapping[str, Any],
    parameters: Mapping[str, Any] | None = None,
    region: str = "us-east-1",
) -> dict[str, Any]:
    """The template as CloudFormation processes it for these parameter values (a template without
    the transform comes back as it is)."""
    if not declares_the_transform(template):
        return _plain(template)
    from cfnlint.template import Template  # noqa: PLC0415
    from cfnlint.template.transforms._language_extensions import (  # noqa: PLC0415
        language_extension,
    )

    parameters = dict(parameters or {})
    problems = _unresolvable_collections(template, parameters)
    if problems:
        raise ValueError("; ".join(problems))
    with_values = copy.deepcopy(dict(template))
    for name, value in parameters.items():
        if name in with_values.get("Parameters", {}):
            with_values["Parameters"][name]["Default"] = str(value)
    matches, expanded = language_extension(Template(None, with_values, regions=[region]))
    if matches or expanded is None:
        raise ValueError(f"{TRANSFORM} does not expand: {[m.message for m in matches]}")
    expanded = _plain(expanded)
    # What CloudFormation keeps: the other transforms, if any, and the parameters as declared.
    rest = [t for t in _as_list(expanded.pop("Transform", [])) if t != TRANSFORM]
    if rest:
        expanded["Transform"] = rest
    expanded["Parameters"] = _plain(template.get("Parameters", {}))
    left = [key for section in expanded.values() if isinstance(section, dict) for key in section]
    if any(str(key).startswith(FOR_EACH) for key in left):
        raise ValueError(f"{TRANSFORM}: a Fn::ForEach is left after the expansion")
    return expanded


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def parameter(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not Parameter=value")
    return name, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("template", type=Path)
    parser.add_argument("parameters", nargs="*", type=parameter, help="Parameter=value")
    parser.add_argument("--output", type=Path, help="write here instead of standard output")
    args = parser.parse_args(argv)
    try:
        expanded = expand(load(args.template), dict(args.parameters))
    except (OSError, ValueError) as error:
        print(f"stack_template: {args.template}: {error}", file=sys.stderr)
        return 1
    text = json.dumps(expanded, indent=2) + "\n"
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
