#!/usr/bin/env bash
# Print the path of a working Python X.Y interpreter, or explain how to get one and fail.
#
#   scripts/find_python.sh 3.10        -> /root/.pyenv/versions/3.10.13/bin/python3.10
#
# Looks, in order, at $PYTHON_X_Y (e.g. PYTHON_3_10=/opt/py310/bin/python), at pythonX.Y on PATH
# (a pyenv shim there only works when that version is selected), then at pyenv's installed versions.
set -euo pipefail

want="${1:?usage: scripts/find_python.sh X.Y}"
[[ "$want" =~ ^[0-9]+\.[0-9]+$ ]] || { echo "find_python.sh: expected a version like 3.10, got '$want'" >&2; exit 2; }

works() {  # the interpreter runs and is the version asked for
  [[ -n "$1" ]] && "$1" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$want'.split('.'))))" \
    >/dev/null 2>&1
}

override_var="PYTHON_${want//./_}"
candidates=("${!override_var:-}" "$(command -v "python$want" 2>/dev/null || true)")
if command -v pyenv >/dev/null 2>&1 || [[ -n "${PYENV_ROOT:-}" ]]; then
  root="${PYENV_ROOT:-$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")}"
  # newest patch release first
  while IFS= read -r dir; do candidates+=("$dir/bin/python$want"); done < <(
    ls -d "$root"/versions/"$want".* 2>/dev/null | sort -rV || true)
fi

for py in "${candidates[@]}"; do
  if works "$py"; then
    echo "$py"
    exit 0
  fi
done

cat >&2 <<MSG
Python $want is required for this target but was not found (tried \$$override_var, python$want on PATH
and pyenv's versions). Install it, e.g. 'pyenv install $want', or point $override_var at an interpreter:
  make ... $override_var=/path/to/python$want
MSG
exit 1
