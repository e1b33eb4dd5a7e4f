"""Lineage queries from the Dagster UI: launch `lineage_query_job` with a kind and an id.

    Launchpad config:  ops: {lineage_query: {config: {kind: subject, id: a31f5ded88e1…}}}
    kinds:             subject | sample | model | erasure_plan   (model: id = VERSION or NAME/VERSION)

The op runs the same query as `flywheel lineage …` / `flywheel dsr plan` (warehouse/lineage.py) and
shows the result as the run's output metadata: the table the CLI prints and the full JSON. Nothing is
written to the flywheel's stores (the result is not an asset: it is a question, not data).
"""

from typing import Any

from dagster import Config, MetadataValue, OpExecutionContext, in_process_executor, job, op

from assets.resources import WarehouseResource

KINDS = ("subject", "sample", "model", "erasure_plan")


class LineageQuery(Config):
    kind: str = "subject"
    id: str
    model: str | None = None  # for kind=model, when id is a bare version


def run_query(kind: str, item_id: str, home, model: str | None = None) -> dict[str, Any]:
    from warehouse import lineage

    if kind == "subject":
        return lineage.lineage_subject_cmd(item_id, home=home)
    if kind == "sample":
        return lineage.lineage_sample_cmd(item_id, home=home)
    if kind == "model":
        return lineage.lineage_model_cmd(item_id, model, home=home)
    if kind == "erasure_plan":
        return lineage.erasure_plan_cmd(item_id, home=home)
    raise ValueError(f"unknown lineage query kind {kind!r}: one of {', '.join(KINDS)}")


def as_text(result: dict[str, Any]) -> str:
    """The CLI's rich table, as plain text."""
    import io

    from rich.console import Console

    from warehouse.lineage import render_table

    console = Console(record=True, width=140, file=io.StringIO())
    console.print(render_table(result))
    return console.export_text()


@op
def lineage_query(context: OpExecutionContext, config: LineageQuery, warehouse: WarehouseResource) -> None:
    """Answer one lineage question; the answer is this run's output metadata."""
    from warehouse.lineage import json_safe

    result = json_safe(run_query(config.kind, config.id, warehouse.paths.home, config.model))
    context.add_output_metadata({
        "kind": config.kind, "id": config.id,
        "table": MetadataValue.md(f"```\n{as_text(result)}\n```"),
        "result": MetadataValue.json(result),
    })


@job(executor_def=in_process_executor, tags={"flywheel/stage": "lineage"})
def lineage_query_job() -> None:
    """Lineage of a subject, a sample or a model version (or an erasure plan), shown in the run."""
    lineage_query()
