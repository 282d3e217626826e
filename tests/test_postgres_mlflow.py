"""The team setup of infra/mlflow: an MLflow server on PostgreSQL; a fine-tune and a merge register through it."""

from __future__ import annotations

import json

import pytest
from conftest import run_job
from mlflow_server import MlflowServer
from postgres import Postgres
from test_finetune import _records, finetune, run_id_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pg_server(tmp_path_factory, tiny_model, ray_head):
    if not Postgres.available():
        pytest.skip("PostgreSQL server binaries not installed (.ci/run installs Debian's postgresql)")
    root = tmp_path_factory.mktemp("pg")
    pg = Postgres().start()
    try:
        server = MlflowServer(root, backend_uri=pg.uri).start()
        try:
            (root / "data.json").write_text(json.dumps(_records(), ensure_ascii=False))
            yield {"root": root, "server": server, "model": tiny_model, "pg": pg, "ray": ray_head}
        finally:
            server.stop()
    finally:
        pg.stop()  # never leave a database server behind, even when setup fails


def test_finetune_and_merge_register_through_a_postgres_backed_server(pg_server):
    from mlflow import MlflowClient

    ft = finetune(pg_server, "pg-run", experiment="pg-tests")
    assert ft.returncode == 0, ft.stdout[-3000:] + ft.stderr[-2000:]
    run_id = run_id_of(ft)
    merged = run_job("jobs/merge.py", "--mlflow_tracking_uri", pg_server["server"].uri, "--run_id", run_id,
                     "--registered_model", "pg-model", "--output_dir", str(pg_server["root"] / "merged"),
                     "--dtype", "fp32", timeout=600)
    assert merged.returncode == 0, merged.stderr[-3000:]
    client = MlflowClient(pg_server["server"].uri)
    version = client.get_model_version_by_alias("pg-model", "champion")
    assert version.version == "1" and version.tags["training_run_id"] == run_id
    assert client.get_run(run_id).data.metrics["best_eval_loss"] > 0
    assert pg_server["pg"].uri.startswith("postgresql+psycopg2://")
