#!/usr/bin/env bash
# The quick test subset on the newest JAX: Python 3.13 in a Debian 13 chroot.
#
#   sudo bash .ci/newest_jax.sh
#
# Makes the chroot once with debootstrap (from the Debian mirror apt already
# uses; about 2.5 minutes), copies the project's tracked files into it,
# installs the project with the newest JAX from the package registry and runs
# the quick tests of the modules a JAX, flax, optax, orbax or grain release
# is likeliest to break (the loop, run folders and checkpoints, sharding, the
# penalties and XLA options, models, data, the command line, the official
# vectors): 197 tests, under 3 minutes on 2 cores, so that CI stays within
# its budget. NEWEST_JAX_PYTEST='-n 2 -m "not slow and not perf"' runs the
# whole quick subset. Set NEWEST_JAX_ROOT to choose the chroot's folder (kept
# between runs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${NEWEST_JAX_ROOT:-/var/tmp/fishr-jax-trixie}
COMPAT_TESTS="tests/test_train_loop.py tests/test_workdir.py tests/test_penalties.py
  tests/test_fast_paths.py tests/test_parallel.py tests/test_train.py
  tests/test_models.py tests/test_resnet.py tests/test_data.py
  tests/test_domainbed_data.py tests/test_cli.py tests/test_reference.py"
PYTEST_ARGS=${NEWEST_JAX_PYTEST:-"-n 2 -m 'not slow and not perf' $(echo $COMPAT_TESTS)"}

if [ ! -x "$ROOT/usr/bin/python3.13" ]; then
  command -v debootstrap > /dev/null || {
    apt-get update -qq && apt-get install -y -qq debootstrap; }
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null \
           | grep -v security | head -1)
  rm -rf "$ROOT"
  debootstrap --variant=minbase \
    --include=python3.13,python3.13-venv,python3-pip,ca-certificates,git \
    trixie "$ROOT" "${mirror:-http://deb.debian.org/debian}"
fi
# pip in the chroot reaches the registry with the host's resolver and CAs.
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
# Without /proc, XLA's CPU feature detection fails and YNNPACK refuses
# mid-size matmuls ("unsupported parameter").
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
trap 'umount "$ROOT/proc" 2> /dev/null || true' EXIT

rm -rf "$ROOT/src/fishr-jax"
mkdir -p "$ROOT/src/fishr-jax"
git ls-files -z --cached --others --exclude-standard \
  | tar -c --null -T - | tar -x -C "$ROOT/src/fishr-jax"
[ -d ../shared ] && cp -r ../shared "$ROOT/src/shared"

env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
  PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
  chroot "$ROOT" /bin/bash -c "
    set -euo pipefail
    cd /src/fishr-jax
    rm -rf /src/venv && python3.13 -m venv /src/venv
    /src/venv/bin/pip install -q -e '.[test]'
    /src/venv/bin/python -c 'import sys, jax, flax, optax, orbax.checkpoint as o, grain
print(\"Python\", sys.version.split()[0], \"jax\", jax.__version__, \"flax\", flax.__version__,
      \"optax\", optax.__version__, \"orbax\", o.__version__)'
    /src/venv/bin/python -m pytest $PYTEST_ARGS"
