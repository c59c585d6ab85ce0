#!/usr/bin/env bash
# The README's test command: install what is missing, then run the whole test suite.
# Extra arguments go to pytest (e.g. -k cuda, -x). Exit code 5 (no tests collected) is an error.
set -uo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh || exit 1
${PYTHON:-python3} -m pytest tests -q -rs "$@"
rc=$?
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests (exit code 5): treating as a failure" >&2
fi
exit $rc
