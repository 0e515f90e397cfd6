"""Evaluate's "Export for serving" section: any finished row as a compressed-tensors checkpoint, built with the same
settings as its evaluation."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from app import progress, state
from engine.export import ExportError, check_exportable, export_job  # the app's only use of the export API


def draw(handle, labels: list[str]) -> None:
    """The section under Evaluate's results; labels: one per finished row, as the results name them."""
    request = st.session_state[state.EVAL_REQUEST]
    if request is None:
        return
    runs, cfg = request
    st.header("Export for serving")
    st.caption(
        "Writes the row as a Hugging Face model directory in the compressed-tensors format (what vLLM and "
        "llm-compressor read): R1/R2 fused, weights packed with their scales, the activation and KV-cache "
        "quantizers and the online R3/R4 rotations in its config. The same directory loads back here as a "
        "model: type its path in the sidebar's Model box, or pass --model DIR."
    )
    pick = st.selectbox("Row", range(len(labels)), format_func=lambda i: labels[i], key="eval_export_row")
    recipe, bits = runs[pick]
    try:
        check_exportable(recipe, bits, handle)
    except ExportError as e:
        st.info(f"This row cannot be exported: {e}")
        return
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(handle.name).name)
    out = st.text_input(
        "Output directory",
        str(Path("exports") / f"{slug}-{recipe.name}-{bits}"),
        key=f"eval_export_dir_{pick}",
        help="A new directory (written to a temporary one beside it and "
        "renamed at the end, so an error leaves nothing behind).",
    )
    force = st.checkbox("Replace an earlier export in that directory", key="eval_export_force")
    if not st.button("Export", key="eval_export"):
        return
    if Path(out).expanduser().exists() and not force:  # the CLI says --force; here it is the checkbox
        st.error(f"{out} already exists: tick 'Replace an earlier export in that directory' or choose another one.")
        return
    try:
        done = progress.run(export_job(handle, recipe, bits, out, cfg, force), f"export {labels[pick]}")
    except ExportError as e:
        st.error(str(e))
        return
    if done is None:
        return
    r = done.result
    st.success(f"Wrote {r['out']}: {r['bytes'] / 2**20:.1f} MiB in {r['seconds']:.0f} s ({', '.join(r['files'])}).")
    for note in r["notes"]:
        st.caption(f"Note: {note}")
