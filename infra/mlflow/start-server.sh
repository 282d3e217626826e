#!/usr/bin/env bash
# A team MLflow tracking server + model registry: PostgreSQL for runs and registry, S3-compatible (or a
# shared filesystem) for artifacts, served through the server (clients need no bucket credentials).
#
#   MLFLOW_DB=postgresql+psycopg2://mlflow:PASSWORD@db.internal:5432/mlflow   (pip install psycopg2-binary) \
#   MLFLOW_ARTIFACTS=s3://my-bucket/mlflow          # or /shared/mlflow-artifacts
#   infra/mlflow/start-server.sh
#
# Clients then set MLFLOW_TRACKING_URI=http://<this host>:5000 (or pass --mlflow_tracking_uri).
set -euo pipefail
: "${MLFLOW_DB:?set MLFLOW_DB to a postgresql:// URI}"
: "${MLFLOW_ARTIFACTS:?set MLFLOW_ARTIFACTS to s3://bucket/prefix or a shared folder}"
HOST="${MLFLOW_HOST:-127.0.0.1}"     # 0.0.0.0 only behind a firewall or an authenticating proxy
PORT="${MLFLOW_PORT:-5000}"
# The GenAI job runner is not needed for training runs and costs ~1.4 GiB (stack-notes §3.1).
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
exec mlflow server \
  --backend-store-uri "$MLFLOW_DB" \
  --artifacts-destination "$MLFLOW_ARTIFACTS" \
  --host "$HOST" --port "$PORT" \
  --workers "${MLFLOW_WORKERS:-4}"
