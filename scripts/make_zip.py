"""Build a zip of the sparkhydrogen package for ``spark-submit --py-files`` (``make zip``)."""

from __future__ import annotations

import argparse
import os
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "src", "sparkhydrogen")


def build(out: str) -> str:
    """Write ``out`` with ``sparkhydrogen/...`` at the top level (no caches); return its path."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for folder, dirs, files in os.walk(PACKAGE):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith((".py", ".typed")):
                    path = os.path.join(folder, name)
                    zf.write(path, os.path.relpath(path, os.path.dirname(PACKAGE)))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default=os.path.join(ROOT, "dist", "sparkhydrogen.zip"))
    print(build(parser.parse_args().output))
