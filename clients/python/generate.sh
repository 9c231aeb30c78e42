#!/usr/bin/env bash
# Generates the Python client code from the proto into clients/python/gen/.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
rm -rf "$here/gen" && mkdir -p "$here/gen"
python3 -m grpc_tools.protoc -I "$here/../../proto" \
  --python_out="$here/gen" --grpc_python_out="$here/gen" \
  "$here/../../proto/stevedore/v1/deployer.proto"
touch "$here/gen/stevedore/__init__.py" "$here/gen/stevedore/v1/__init__.py"
