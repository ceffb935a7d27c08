#!/usr/bin/env bash
# Build and push the rlr-dist images.
#   IMAGE=ghcr.io/OWNER/rlr-dist:0.1.0 infra/build.sh
#   IMAGE=... MLFLOW_IMAGE=ghcr.io/OWNER/rlr-dist-mlflow:0.1.0 infra/build.sh   # also the MLflow server
# Optional: TORCH_INDEX_URL (default in infra/Dockerfile), PLATFORM (default linux/amd64),
#           PUSH=0 to build without pushing.
# Log in to the registry first (docker login / aws ecr get-login-password ...); no credentials here.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${IMAGE:?set IMAGE, e.g. IMAGE=ghcr.io/OWNER/rlr-dist:0.1.0}"
name="${IMAGE##*/}"   # last path component: repo[:tag][@digest]
if [[ "$name" != *:* && "$name" != *@sha256:* ]]; then
  echo "IMAGE needs an explicit tag or digest (no implicit latest): $IMAGE" >&2; exit 2
fi
if [[ "$name" == *:latest ]]; then echo "refusing the 'latest' tag; use a version: $IMAGE" >&2; exit 2; fi

PLATFORM="${PLATFORM:-linux/amd64}"
PUSH="${PUSH:-1}"
args=(--platform "$PLATFORM" -f infra/Dockerfile)
if [ -n "${TORCH_INDEX_URL:-}" ]; then args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL"); fi
export DOCKER_BUILDKIT=1   # needed for infra/Dockerfile.dockerignore

docker build "${args[@]}" --target runtime -t "$IMAGE" .
if [ -n "${MLFLOW_IMAGE:-}" ]; then
  docker build "${args[@]}" --target mlflow -t "$MLFLOW_IMAGE" .
fi

if [ "$PUSH" = "1" ]; then
  docker push "$IMAGE"
  if [ -n "${MLFLOW_IMAGE:-}" ]; then docker push "$MLFLOW_IMAGE"; fi
  # The digest is what to put in RLR_DIST_IMAGE for reproducible clusters.
  docker image inspect --format '{{index .RepoDigests 0}}' "$IMAGE" || true
fi
