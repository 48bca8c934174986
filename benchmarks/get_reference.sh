#!/bin/sh
# Clone the reference HVAE implementation (causal-gen) at the commit benchmarks/ref_step.py was
# measured against:  sh benchmarks/get_reference.sh DIR  then  --reference DIR
set -eu
DIR=${1:-causal-gen}
URL=${CAUSAL_GEN_URL:-https://github.com/biomedia-mira/causal-gen.git}
COMMIT=e0e4e22f8ad972b9d3b7dd662fa77d9d7c845078
[ -d "$DIR/.git" ] || git clone --quiet "$URL" "$DIR"
git -C "$DIR" checkout --quiet "$COMMIT"
echo "$DIR at $(git -C "$DIR" rev-parse HEAD)"
