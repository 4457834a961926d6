"""`python -m tools.bicepcheck`: every check over every bicep/*.bicepparam; exit status 1 when anything is wrong."""

from __future__ import annotations

import sys

from .checks import bicep_files, check, params_files, syntax_problems


def main() -> int:
    problems = syntax_problems([*bicep_files(), *params_files()])
    for path in params_files():
        report = check(path)
        problems.extend(f"[{path.name}] {p}" for p in report.problems)
        print(f"{path.name}: {len(report.deployment.all_resources())} resources, {len(report.problems)} problems")
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
