"""Export one evaluation row as a compressed-tensors checkpoint (writer.py) with the standalone loader
(load_with_transforms.py, copied into each export). Reading one back: engine.model.compressed."""

from engine.export.writer import (
    LOADER_FILE,
    LOADER_PATH,
    MARKER,
    ExportError,
    check_destination,
    check_exportable,
    export_job,
    export_row,
    runtime_notes,
    stored_matrix,
    transform_type,
    write_checkpoint,
)

__all__ = [
    "LOADER_FILE",
    "LOADER_PATH",
    "MARKER",
    "ExportError",
    "check_destination",
    "check_exportable",
    "export_job",
    "export_row",
    "runtime_notes",
    "stored_matrix",
    "transform_type",
    "write_checkpoint",
]
