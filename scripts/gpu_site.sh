#!/usr/bin/env bash
# Builds .whl/site.tgz for scripts/gpu_checks.sh: the packages a lent GPU machine (Python 3.12, torch,
# transformers, accelerate already there; no registry reachable) lacks, as pinned here, unpacked from
# their wheels. Trimmed to fit the 64 MiB a call may carry: bitsandbytes keeps its CUDA 13.0 and CPU
# libraries only, unsloth drops its web UI (studio/); DeepSpeed is copied from .venv. Run here, in the
# repository root, after scripts/setup.sh.
set -euo pipefail
PINS="trl==1.15.0 datasets==4.8.5 peft==0.21.2 bitsandbytes==0.50.2 unsloth==2026.10.9 unsloth_zoo==2026.10.9
      torchao==0.18.0 dill==0.4.1 multiprocess==0.70.19 msgspec==0.22.0 tyro==1.0.17 typeguard==4.6.0
      docstring-parser cut-cross-entropy==25.1.1
      hjson==3.1.0 py-cpuinfo==9.0.0 ninja==1.13.2 msgpack==1.2.4 einops==0.8.2 pydantic==2.14.3
      pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0"
WHEELS=$(mktemp -d); SITE=$(mktemp -d)
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
  -d "$WHEELS" $PINS
for w in "$WHEELS"/*.whl; do unzip -q -o "$w" -d "$SITE"; done
# DeepSpeed ships no wheel (an sdist whose ops compile on first use): its pure-Python package as installed
# in .venv by scripts/setup.sh (requirements.txt pins it), csrc included for the CPU Adam JIT build
PURELIB=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp -r "$PURELIB"/deepspeed "$PURELIB"/deepspeed-*.dist-info "$SITE"/
find "$SITE"/deepspeed -name '__pycache__' -prune -exec rm -rf {} +
rm -rf "$SITE"/studio "$SITE"/test "$SITE"/unsloth_cli
find "$SITE"/bitsandbytes -name 'libbitsandbytes_*' ! -name '*cuda130*' ! -name '*cpu*' -delete
mkdir -p .whl && tar czf .whl/site.tgz -C "$SITE" . && du -h .whl/site.tgz
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
