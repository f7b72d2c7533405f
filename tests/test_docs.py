"""Generated files stay in step with their sources."""

from __future__ import annotations

from nvml_exporter import xidcatalog
from nvml_exporter.metrics import ALL_METRICS, NODE_GPU_FAMILIES, render_markdown
from tests.fakenvml.scenario import REPO, SHIPPED_H100X8, h100_node, read_conf


def test_metrics_reference_is_generated_from_the_table() -> None:
    doc = (REPO / "docs" / "metrics.md").read_text()
    assert doc == render_markdown(), "run `make docs`"
    for m in ALL_METRICS:
        assert f"`{m.name}`" in doc


def test_metric_names_follow_the_contract() -> None:
    for m in ALL_METRICS:
        assert m.name.startswith(("nvidia_gpu_", "nvml_exporter_", "nvidia_nvswitch_")), m.name
        assert m.per_gpu == (m.name.startswith("nvidia_gpu_") and m.name not in NODE_GPU_FAMILIES), m.name
        assert m.name.endswith("_total") == (m.type == "counter"), m.name
        assert not {"gpu", "uuid"} & set(m.labels) or not m.per_gpu, m.name


def test_shipped_demo_scenario_is_the_generated_one() -> None:
    assert read_conf(SHIPPED_H100X8) == h100_node(8), "regenerate: python -m tests.fakenvml.scenario"


def test_xid_catalog_doc_is_generated() -> None:
    assert (REPO / "docs" / "xid-catalog.md").read_text() == xidcatalog.render_markdown(), "run `make docs`"
