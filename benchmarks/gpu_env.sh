# Sourced by the GPU-call scripts (benchmarks/h200_*.sh), from the repo root on the GPU machine: carried
# wheels (.whl) installed into /tmp/site, src/ and them on PYTHONPATH, the machine named in the log.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:?set OUT}"
site=/tmp/site
mkdir -p $site
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $site .whl/*.whl
export PYTHONPATH="$site:$PWD/src"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
