"""Entry point of the processes a torch launch starts: ``python -m sparkhydrogen.torch._proc MODE ...``.

``local``: one local-mode rank (:mod:`._local`, its task on stdin). ``script PATH ARGS...``
and ``function DIR``: a rank's training child process (:mod:`._child`). Nothing imports
this module, so running it with ``-m`` never runs a module twice.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if argv[:1] == ["local"] and len(argv) == 1:
        from ._local import main as local_main

        return local_main()
    from ._child import main as child_main

    return child_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
