#!/usr/bin/env bash
# Packaging smoke check (run by .ci/run after the test suite): build the wheel, install it into a fresh virtual
# environment (torch pinned to the CPU build, as `make install` does), and from an empty folder, offline, run
# `kdistill --help`, a short quickstart and one built-in evaluation task on a tiny model. Fails if anything
# printed or written there names the checkout: an installed kdistill must not depend on where it was built.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "package smoke check in $work"
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$repo" >"$work/build.log" 2>&1 \
    || { cat "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/kdistill-*.whl)
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
"$work/venv/bin/pip" install --quiet -c "$repo/constraints/cpu.txt" "${wheel}[quickstart]" >"$work/install.log" 2>&1 \
    || { tail -30 "$work/install.log"; exit 1; }

mkdir "$work/empty"
cd "$work/empty"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset PYTHONPATH
bin="$work/venv/bin"
log="$work/smoke.log"
{
    "$bin/python" -c "import kdistill, sys; print('kdistill from', kdistill.__file__)"
    "$bin/kdistill" --help
    "$bin/kdistill" quickstart --out qs --max-sentences 256 --sts-limit 64
    text=$("$bin/python" -c "from kdistill.bundled import HATE_SPEECH, bundled_path; print(bundled_path(HATE_SPEECH))")
    "$bin/kdistill" tiny --out tiny --kind causal --data "$text" --vocab-size 400
    "$bin/kdistill" eval classify --model tiny/student --task hate_speech --limit 32 --out classify.json
} >"$log" 2>&1 || { cat "$log"; echo "package smoke check: a command failed" >&2; exit 1; }
cat "$log"

case "$("$bin/python" -c "import kdistill; print(kdistill.__file__)")" in
    "$repo"/*) echo "package smoke check: kdistill was imported from the checkout" >&2; exit 1 ;;
esac
if grep -rnF "$repo" "$log" "$work/empty" >/dev/null 2>&1; then
    grep -rnF "$repo" "$log" "$work/empty" | head -5 >&2
    echo "package smoke check: the checkout's path ($repo) shows up in the run" >&2
    exit 1
fi
[ -s qs/quickstart.json ] && [ -s classify.json ] || { echo "package smoke check: results missing" >&2; exit 1; }
echo "package smoke check: passed"
