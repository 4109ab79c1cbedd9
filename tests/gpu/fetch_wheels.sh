#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the Python 3.12 wheels that tests/gpu/run.sh needs on the GPU machine and that
# its image lacks (webdataset, braceexpand, lmdb, wandb and what wandb imports), into .whl/ (git-ignored).
# The versions are those this project's CPU environment runs and tests. Also Fashion-MNIST's four IDX files
# (Debian's dataset-fashion-mnist, 31 MB) and the feature classifier trained on them here, into .fashion/, so
# that the GPU spends no time training it (it is the same file there: the shards are byte-identical). Then:
#   device run: carry [".whl", ".fashion"], command "bash tests/gpu/run.sh"
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    webdataset==1.0.2 braceexpand==0.1.7 lmdb==3.0.0 wandb==0.31.0 cwevals==0.0.1b1 distro==1.9.0 sniffio==1.3.1 \
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing_extensions==4.16.0 platformdirs==4.14.9 protobuf==7.36.2 googleapis-common-protos==1.76.0 \
    opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2 \
    opentelemetry-proto==1.45.2 opentelemetry-exporter-otlp-proto-http==1.45.2 \
    opentelemetry-exporter-otlp-proto-common==1.45.2 opentelemetry-exporter-otlp-common==0.66b2 \
    opentelemetry-exporter-http-transport==0.66b2
mkdir -p .fashion
cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .fashion/
python3 tests/gpu/fashion.py --idx .fashion --work build/fashion-cache --json build/fashion-cache.json \
    --cache .fashion/cache --cache-only
du -sh .whl .fashion
