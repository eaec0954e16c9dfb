"""The program ``python -m emlab <command>`` (and the ``emlab`` script): the command runs in the run's warm worker
when there is one (:mod:`emlab.worker`), else in this process (:func:`emlab.cli.run`)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from .cli import run
    from .worker import run_via_worker

    argv = sys.argv[1:] if argv is None else argv
    code = run_via_worker(argv)
    if code is not None:
        raise SystemExit(code)
    run(argv)


if __name__ == "__main__":
    main()
