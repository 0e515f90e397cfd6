"""The Kernels page on this CPU machine, as a user meets it: the no-GPU warning, the latest recorded GPU run (the one
docs/BENCHMARKS.md calls latest, with its numbers), and the run form, which says why nothing can be timed here."""

import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

from kernels.bench import KERNEL_LABELS
from tests.app.apptest import decode, figures, open_page, table, title
from tests.helpers import latest_recorded_csv

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what the page shows without a CUDA GPU")


@pytest.fixture
def kernels_page() -> AppTest:
    return open_page("kernels")


def _figures(at: AppTest) -> dict[str, dict]:
    return {title(f): f for f in figures(at)}


def test_without_gpu_the_page_says_so_and_shows_the_latest_recorded_run(kernels_page):
    at = kernels_page
    assert [t.value for t in at.title] == ["Online-rotation kernels"]
    warnings = [w.value for w in at.warning]
    assert len(warnings) == 1 and warnings[0].startswith("No CUDA GPU on this machine, so nothing can be timed here")
    assert "latest recorded GPU run (NVIDIA H100 80GB, 2026-11-23 17:58 UTC" in warnings[0]
    assert "docs/BENCHMARKS.md" in warnings[0]

    # the figure plots the latest run's CSV, row for row: memcpy (the floor) and the Triton kernel at d = 11008
    recorded = pd.read_csv(latest_recorded_csv())
    at_d = recorded[recorded.d == 11008]
    figures = _figures(at)
    assert list(figures) == ["Recorded latency vs tokens, d = 11008, fp16, block 128"]
    fig = figures["Recorded latency vs tokens, d = 11008, fp16, block 128"]
    assert fig["layout"]["xaxis"]["title"]["text"].startswith("tokens L")
    assert fig["layout"]["yaxis"]["title"]["text"].startswith("median time, microseconds")
    traces = {t["name"]: t for t in fig["data"]}
    for kernel, name in (("memcpy", "memcpy (clone): the floor"), ("triton_blockdiag", "Triton block-diagonal")):
        want = at_d[at_d.kernel == kernel].sort_values("L")
        assert decode(traces[name]["x"]) == want.L.tolist(), name
        assert decode(traces[name]["y"]) == pytest.approx(want.median_us.tolist()), name
    legend = {name.removesuffix(": the floor") for name in traces}
    assert {KERNEL_LABELS[k] for k in at_d.kernel} <= legend  # every recorded kernel, under its readable name
    assert len(traces) == at_d.kernel.nunique() + 1  # plus the package's padded FHT, recorded separately

    # the table holds the same numbers, the floor first
    times = table(at, 0)
    assert times.index[0] == "memcpy (clone)"
    memcpy = at_d[at_d.kernel == "memcpy"].sort_values("L")
    assert times.loc["memcpy (clone)"].tolist() == pytest.approx(memcpy.median_us.tolist())


def test_run_form_without_gpu_shows_why_nothing_is_timed(kernels_page):
    at = kernels_page
    assert [b.label for b in at.button] == ["Run benchmark"], "the form's submit button"
    at.button(key="kern_run").click().run()
    assert not at.exception, at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1, errors
    assert errors[0].startswith("no CUDA GPU is visible to torch: the kernel benchmark needs one.")
    assert "docs/BENCHMARKS.md" in errors[0] and "python -m kernels.bench" in errors[0]
    # the recorded run stays on the page under the message, and no benchmark table or download appears
    assert any(w.value.startswith("No CUDA GPU") for w in at.warning)
    assert len(at.table) == 1 and not at.get("download_button")


def test_run_form_checks_its_inputs_before_the_gpu(kernels_page):
    # an empty choice is refused with a message naming what is missing, also on a machine without a GPU
    at = kernels_page
    widths = next(m for m in at.multiselect if m.label == "Widths d")
    widths.set_value([])
    at.button(key="kern_run").click().run()
    assert not at.exception, at.exception
    assert [e.value for e in at.error] == ["give at least one width d and one token count L"]
