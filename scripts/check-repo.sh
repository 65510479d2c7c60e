#!/usr/bin/env bash
# Keep the repository small: a submission over the size limit is refused whole, so no tracked
# file may exceed 2 MiB (data a script can make again stays out of git).
set -euo pipefail
cd "$(dirname "$0")/.."
limit=$((2 * 1024 * 1024))
bad=0
while IFS= read -r -d '' f; do
  [ -f "$f" ] || continue
  size=$(stat -c %s "$f")
  if [ "$size" -gt "$limit" ]; then
    echo "check-repo: $f is $size bytes (> 2 MiB); keep generated or large data out of git" >&2
    bad=1
  fi
done < <(git ls-files -z)
total=$(git ls-files -z | xargs -0 -r stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
echo "check-repo: $(git ls-files | wc -l) tracked files, $((total / 1024)) KiB"
exit $bad
